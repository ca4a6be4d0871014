"""Single-file original checkpoints (CompVis / Stability layout) <-> diffusers state dicts.

Community models ship as one ``.safetensors`` with every component under a
prefix: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE),
``cond_stage_model.*`` (SD 1.x CLIP / SD 2.x OpenCLIP) or
``conditioner.embedders.{0,1}.*`` (SDXL's two encoders; the refiner's bigG OpenCLIP is ``embedders.0``).

The map is written once, from diffusers key to original key, over the full
set of diffusers keys that the architecture (a ``Layout``) implies. Loading
inverts it, so a key that maps nowhere and a parameter left unfilled both
raise. Three tensors change shape on the way: OpenCLIP's fused ``in_proj``
(q, k, v are row slices of it), OpenCLIP's ``text_projection`` (stored as
``x @ P``, a Linear weight is ``P.T``) and the VAE mid-block attention
(1x1 convs in the original, Linear in diffusers). The rules match
``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``). Pure numpy: nothing here imports a model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from sd_jax.convert.single_file_detect import (  # noqa: F401  (re-exported: the single-file API)
    ARCHITECTURES,
    COMPONENTS,
    architecture_of,
    check_architecture,
    detect_architecture,
)
from sd_jax.errors import MissingParameterError, UnexpectedKeyError, UnsupportedArchitectureError

# Prefix of each component; the first that matches wins (longest first where they nest).
PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
)
# Buffers and training leftovers that are not model parameters: reported, never loaded.
# (``low_scale_model`` is the x4 upscaler's noise-augmentation schedule; ``first_stage_model.loss`` the
# VAE's training loss, LPIPS and discriminator.)
_SCHEDULE = r"(betas|alphas_cumprod\w*|sqrt_\w+|log_one_minus_\w+|posterior_\w+|logvar|lvlb_weights)"
IGNORED = re.compile(
    rf"^(model_ema\.|{_SCHEDULE}$|low_scale_model\.{_SCHEDULE}$|model\.diffusion_model\.logvar$"
    r"|first_stage_model\.loss\.|denoiser\.(sigmas|log_sigmas)$|.*position_ids$|.*logit_scale$|.*\.attn_mask$)"
)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
_OPENCLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
_WB = ("weight", "bias")
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything the key map depends on.

    ``unet`` is our ``UNetConfig`` (only its block layout is read: block_out_channels,
    down/up_block_types, layers_per_block, transformer_layers_per_block, has_mid_block,
    addition_embed_type, num_class_embeds). The VAE is its ``block_out_channels`` and
    ``layers_per_block``; each text encoder its number of layers.
    """

    arch: str
    unet: Any
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    text_layers: tuple[int, ...]  # text_encoder[, text_encoder_2] (the refiner: text_encoder_2 only)

    def prefix(self, component: str) -> str:
        if component == "unet":
            return "model.diffusion_model."
        if component == "vae":
            return "first_stage_model."
        if self.arch == "sdxl_refiner" and component == "text_encoder_2":  # its one embedder is the bigG OpenCLIP
            return "conditioner.embedders.0."
        if self.arch == "sdxl":
            return {"text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}[component]
        if component == "text_encoder":
            return "cond_stage_model."
        raise UnsupportedArchitectureError(f"single file: {self.arch} has no {component}")

    def openclip(self, component: str) -> bool:
        """OpenCLIP names (``model.*``) rather than transformers names (``transformer.*``)."""
        return not (component == "text_encoder" and self.arch in ("sd1", "sd1_inpaint", "sdxl"))

    def text_index(self, component: str) -> int:
        """Where ``component`` is in ``text_layers``."""
        i = 0 if self.arch == "sdxl_refiner" else COMPONENTS.index(component) - 2
        if (
            component not in COMPONENTS[2:]
            or i >= len(self.text_layers)
            or (self.arch == "sdxl_refiner" and component != "text_encoder_2")
        ):
            raise UnsupportedArchitectureError(f"single file: the layout of {self.arch} has no {component}")
        return i


def _fmt(items: Iterable[str]) -> str:
    items = sorted(items)
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "\n  " + "\n  ".join(items[:_MAX_LISTED]) + more


def _sub(rest: str, table: Mapping[str, str]) -> str:
    for ours, theirs in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    return rest


# -- the diffusers keys an architecture has, each with its original name --


def _resnet(prefix: str, orig: str, c_in: int, c_out: int, time: bool, table: Mapping[str, str]):
    parts = ["norm1", "conv1", "norm2", "conv2"] + (["time_emb_proj"] if time else [])
    if c_in != c_out:
        parts.append("conv_shortcut")
    return {f"{prefix}.{p}.{wb}": f"{orig}.{table.get(p, p)}.{wb}" for p in parts for wb in _WB}


def _transformer(prefix: str, orig: str, depth: int):
    out = {f"{prefix}.{p}.{wb}": f"{orig}.{p}.{wb}" for p in ("norm", "proj_in", "proj_out") for wb in _WB}
    for k in range(depth):
        b = f"transformer_blocks.{k}"
        names = [f"{b}.{a}.to_{x}.weight" for a in ("attn1", "attn2") for x in "qkv"]
        names += [f"{b}.{p}.{wb}" for p in ("attn1.to_out.0", "attn2.to_out.0", "norm1", "norm2", "norm3",
                                            "ff.net.0.proj", "ff.net.2") for wb in _WB]  # fmt: skip
        out.update({f"{prefix}.{n}": f"{orig}.{n}" for n in names})
    return out


def unet_keys(cfg) -> dict[str, str]:
    """{diffusers key: original key, unprefixed} of a ``UNet2DConditionModel`` (``convert_ldm_unet_checkpoint``)."""
    if getattr(cfg, "time_cond_proj_dim", None):
        raise UnsupportedArchitectureError("single file: U-Nets with time_cond_proj_dim (LCM) have no original layout")
    ch, n = tuple(cfg.block_out_channels), len(cfg.block_out_channels)
    layers, depth = tuple(cfg.layers_per_block), tuple(cfg.transformer_layers_per_block)
    down_attn = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    up_attn = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    out = {f"{d}.{wb}": f"{o}.{wb}" for d, o in fixed.items() for wb in _WB}
    if cfg.addition_embed_type == "text_time":
        out.update({f"add_embedding.linear_{i}.{wb}": f"label_emb.0.{2 * i - 2}.{wb}" for i in (1, 2) for wb in _WB})
    elif cfg.addition_embed_type is not None:
        raise UnsupportedArchitectureError(f"single file: addition_embed_type={cfg.addition_embed_type!r}")
    if cfg.num_class_embeds:
        out["class_embedding.weight"] = "label_emb.weight"
    idx = 1  # input_blocks.0 is conv_in
    for i in range(n):
        for j in range(layers[i]):
            c_in = (ch[i - 1] if i else ch[0]) if j == 0 else ch[i]
            out.update(_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", c_in, ch[i], True, _RESNET))
            if down_attn[i]:
                out.update(_transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", depth[i]))
            idx += 1
        if i < n - 1:
            out.update({f"down_blocks.{i}.downsamplers.0.conv.{wb}": f"input_blocks.{idx}.0.op.{wb}" for wb in _WB})
            idx += 1
    if cfg.has_mid_block:
        for j, o in ((0, 0), (1, 2)):
            out.update(_resnet(f"mid_block.resnets.{j}", f"middle_block.{o}", ch[-1], ch[-1], True, _RESNET))
        out.update(_transformer("mid_block.attentions.0", "middle_block.1", depth[-1]))
    rch, rlayers, rdepth = ch[::-1], layers[::-1], depth[::-1]
    idx = 0
    for i in range(n):
        prev = rch[i - 1] if i else rch[0]
        skip_in = rch[min(i + 1, n - 1)]
        for j in range(rlayers[i] + 1):
            skip = skip_in if j == rlayers[i] else rch[i]
            c_in = (prev if j == 0 else rch[i]) + skip
            out.update(_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", c_in, rch[i], True, _RESNET))
            if up_attn[i]:
                out.update(_transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", rdepth[i]))
            idx += 1
        if i < n - 1:  # the upsampler sits in the block's last output_blocks entry, after any attention
            pos = 2 if up_attn[i] else 1
            out.update(
                {f"up_blocks.{i}.upsamplers.0.conv.{wb}": f"output_blocks.{idx - 1}.{pos}.conv.{wb}" for wb in _WB}
            )
    return out


def vae_keys(channels: tuple[int, ...], layers_per_block: int) -> dict[str, str]:
    """{diffusers key: original key, unprefixed} of an ``AutoencoderKL`` (``convert_ldm_vae_checkpoint``)."""
    n, sc = len(channels), {"conv_shortcut": "nin_shortcut"}
    out = {f"{p}.{wb}": f"{p}.{wb}" for p in ("quant_conv", "post_quant_conv") for wb in _WB}
    for part in ("encoder", "decoder"):
        out.update({f"{part}.{p}.{wb}": f"{part}.{o}.{wb}" for p, o in [("conv_in", "conv_in"),
                    ("conv_norm_out", "norm_out"), ("conv_out", "conv_out")] for wb in _WB})  # fmt: skip
        mid = channels[-1]
        for j in range(2):
            out.update(_resnet(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", mid, mid, False, sc))
        out.update({f"{part}.mid_block.attentions.0.{p}.{wb}": f"{part}.mid.attn_1.{o}.{wb}"
                    for p, o in _VAE_ATTN.items() for wb in _WB})  # fmt: skip
    for i in range(n):
        for j in range(layers_per_block):
            c_in = (channels[i - 1] if i else channels[0]) if j == 0 else channels[i]
            d, o = f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"
            out.update(_resnet(d, o, c_in, channels[i], False, sc))
        if i < n - 1:
            d, o = f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"
            out.update({f"{d}.{wb}": f"{o}.{wb}" for wb in _WB})
    rch = channels[::-1]
    for i in range(n):
        level = n - 1 - i  # the original decoder counts its levels from the bottom
        for j in range(layers_per_block + 1):
            c_in = (rch[i - 1] if i else rch[0]) if j == 0 else rch[i]
            d, o = f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}"
            out.update(_resnet(d, o, c_in, rch[i], False, sc))
        if i < n - 1:
            d, o = f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"
            out.update({f"{d}.{wb}": f"{o}.{wb}" for wb in _WB})
    return out


def clip_keys(num_layers: int, projection: bool, openclip: bool) -> dict[str, tuple[str, int | None]]:
    """{transformers key: (original key without prefix, q/k/v slice of a fused in_proj or None)}."""
    layer = [f"{p}.{wb}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") for wb in _WB]  # fmt: skip
    keys = [k for k in _OPENCLIP_FIXED if projection or k != "text_projection.weight"]
    keys += [f"text_model.encoder.layers.{i}.{p}" for i in range(num_layers) for p in layer]
    if not openclip:
        return {k: ("transformer." + k, None) for k in keys}
    out = {}
    for k in keys:
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k)
        if not m:
            out[k] = ("model." + _OPENCLIP_FIXED[k], None)
            continue
        q = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", m[2])
        if q:
            out[k] = (f"model.transformer.resblocks.{m[1]}.attn.in_proj_{q[2]}", "qkv".index(q[1]))
        else:
            out[k] = (f"model.transformer.resblocks.{m[1]}.{_sub(m[2], _OPENCLIP_LAYER)}", None)
    return out


def key_map(component: str, layout: Layout) -> dict[str, tuple[str, int | None]]:
    """{diffusers key: (full original key, q/k/v slice or None)} of one component."""
    prefix = layout.prefix(component)
    if component == "unet":
        table = {k: (v, None) for k, v in unet_keys(layout.unet).items()}
    elif component == "vae":
        table = {k: (v, None) for k, v in vae_keys(tuple(layout.vae_channels), layout.vae_layers_per_block).items()}
    else:
        layers = layout.text_layers[layout.text_index(component)]
        table = clip_keys(layers, component == "text_encoder_2", layout.openclip(component))
    return {k: (prefix + v, sl) for k, (v, sl) in table.items()}


# -- splitting a file and detecting what it is --


def _legacy_clip_key(k: str) -> str:
    # Checkpoints saved with transformers < 4.x lack the ``text_model.`` level of CLIPTextModel.
    m = re.match(r"cond_stage_model\.transformer\.(embeddings|encoder|final_layer_norm)\.", k)
    return k.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.", 1) if m else k


def split_original(state: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Group a single-file state dict by component (keys kept whole).

    Returns ``(parts, report)``: ``report["ignored"]`` lists the known
    non-parameters that were skipped (EMA copies, schedule buffers,
    ``position_ids``, ``logit_scale``...) and ``report["unknown"]`` the keys under
    no known prefix, which the caller must treat as an error.
    """
    parts: dict[str, dict[str, Any]] = {}
    report: dict[str, list[str]] = {"ignored": [], "unknown": []}
    for k, v in state.items():
        if IGNORED.match(k):
            report["ignored"].append(k)
            continue
        comp = next((c for p, c in PREFIXES if k.startswith(p)), None)
        if comp is None:
            report["unknown"].append(k)
            continue
        parts.setdefault(comp, {})[_legacy_clip_key(k)] = v
    return parts, report


# -- conversions --


def _to_diffusers(ok: str, v: np.ndarray) -> np.ndarray:
    if ok.endswith("text_projection"):  # OpenCLIP stores x @ P; a Linear weight is P.T
        return v.T
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ok) and v.ndim == 4:
        return v[:, :, 0, 0]  # 1x1 convs in the original, Linear in diffusers
    return v


def _to_original(ok: str, v: np.ndarray) -> np.ndarray:
    if ok.endswith("text_projection"):
        return v.T
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ok) and v.ndim == 2:
        return v[:, :, None, None]
    return v


def _unused(component: str, key: str, layout: Layout) -> bool:
    """Parameters a single file carries but the diffusers model never uses."""
    if component in ("unet", "vae") or not layout.openclip(component):
        return False
    # SD 2.x keeps OpenCLIP's last block and its projection; SD uses the penultimate layer without projection.
    m = re.match(r".*\.model\.transformer\.resblocks\.(\d+)\.", key)
    return bool(m and int(m[1]) >= layout.text_layers[layout.text_index(component)]) or (
        component == "text_encoder" and key.endswith(".model.text_projection")
    )


def original_to_diffusers(
    component: str, state: Mapping[str, Any], layout: Layout, *, source: str = "single file", report=None
) -> dict[str, np.ndarray]:
    """One component's original-layout tensors -> its diffusers/transformers state dict, strictly.

    Keys of other components are skipped. Unused parameters (SD 2.x's last
    OpenCLIP block) are appended to ``report`` if given.
    """
    km = key_map(component, layout)
    prefix = layout.prefix(component)
    mine = {k for k in state if k.startswith(prefix)}
    used = {ok for ok, _ in km.values()}
    unused = sorted(k for k in mine - used if _unused(component, k, layout))
    unknown = mine - used - set(unused)
    if unknown:
        raise UnexpectedKeyError(
            f"{source}: {len(unknown)} {component} tensor(s) map to no parameter of the {layout.arch} "
            f"architecture (wrong config?):{_fmt(unknown)}"
        )
    missing = [f"{ok} (diffusers {dk})" for dk, (ok, _) in km.items() if ok not in state]
    if missing:
        raise MissingParameterError(
            f"{source}: {len(missing)} {component} tensor(s) the {layout.arch} architecture needs are absent:"
            f"{_fmt(missing)}"
        )
    if report is not None:
        report.extend(unused)
    out = {}
    for dk, (ok, sl) in km.items():
        v = np.asarray(state[ok])
        if sl is not None:
            if v.shape[0] % 3:
                raise UnexpectedKeyError(f"{source}: {ok} has shape {v.shape}, not a fused q/k/v (rows % 3 != 0)")
            v = np.split(v, 3, axis=0)[sl]
        out[dk] = _to_diffusers(ok, v)
    return out


def diffusers_to_original(component: str, state: Mapping[str, Any], layout: Layout) -> dict[str, np.ndarray]:
    """The inverse: a diffusers/transformers state dict -> original-layout keys (fusing q/k/v)."""
    km = key_map(component, layout)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    unknown = set(state) - set(km)
    if unknown:
        raise UnexpectedKeyError(f"{component}: {len(unknown)} key(s) have no original name:{_fmt(unknown)}")
    missing = set(km) - set(state)
    if missing:
        raise MissingParameterError(f"{component}: {len(missing)} key(s) the original layout needs:{_fmt(missing)}")
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, np.ndarray]] = {}
    for dk, (ok, sl) in km.items():
        v = np.asarray(state[dk])
        if sl is None:
            out[ok] = _to_original(ok, v)
        else:
            fused.setdefault(ok, {})[sl] = v
    for ok, parts in fused.items():
        out[ok] = np.concatenate([parts[i] for i in range(3)], axis=0)
    return out
