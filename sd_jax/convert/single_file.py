"""Single-file original checkpoints (CompVis / Stability layout) <-> diffusers state dicts.

Community models ship as one ``.safetensors`` with every component under a
prefix: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE),
``cond_stage_model.*`` (SD 1.x CLIP / SD 2.x OpenCLIP) or
``conditioner.embedders.{0,1}.*`` (SDXL's two encoders).

The map is written once, from diffusers key to original key, and derived
from the architecture. Loading inverts it, so a key that maps nowhere and a
parameter left unfilled are both caught. OpenCLIP's fused ``in_proj`` is the
one many-to-one case (q, k, v are row slices of it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from sd_jax.errors import MissingParameterError, UnexpectedKeyError, UnsupportedArchitectureError

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",  # SD 1.x/2.x; SDXL uses conditioner.embedders.0.
    "text_encoder_2": "conditioner.embedders.1.",
}
SDXL_TEXT_ENCODER = "conditioner.embedders.0."
# Buffers and training leftovers that are not model parameters (reported, not loaded).
IGNORED = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|logvar$|model\.diffusion_model\.logvar"
    r"|lvlb_weights$|.*position_ids$|.*logit_scale$|.*\.attn_mask$)"
)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, table: Mapping[str, str]) -> str:
    for ours, theirs in table.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    return rest


def unet_key(key: str, layers: tuple[int, ...], attention: tuple[bool, ...]) -> str:
    """diffusers U-Net key -> ``model.diffusion_model`` key (``layers``/``attention`` per down level)."""
    n = len(layers)
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + sum(layers[k] + 1 for k in range(i))
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{_sub(rest, _RESNET)}"
        if kind == "attentions":
            return f"input_blocks.{base + j}.1.{rest}"
        return f"input_blocks.{base + layers[i]}.0.{rest.replace('conv.', 'op.', 1)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        up_layers = tuple(reversed(layers))
        up_attn = tuple(reversed(attention))
        base = sum(up_layers[k] + 1 for k in range(i))
        if kind == "resnets":
            return f"output_blocks.{base + j}.0.{_sub(rest, _RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{base + j}.1.{rest}"
        return f"output_blocks.{base + up_layers[i]}.{2 if up_attn[i] else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(m[1], int(m[2]))]
        return f"middle_block.{idx}.{_sub(m[3], _RESNET) if m[1] == 'resnets' else m[3]}"
    del n
    return _sub(
        key,
        {
            "conv_in": "input_blocks.0.0",
            "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2",
            "class_embedding": "label_emb",
            "conv_norm_out": "out.0",
            "conv_out": "out.2",
        },
    )


def vae_key(key: str, levels: int) -> str:
    """diffusers VAE key -> ``first_stage_model`` key."""
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        part, _, i, kind, j, rest = m.groups()
        i = int(i) if part == "encoder" else levels - 1 - int(i)  # the original decoder counts up from the bottom
        level = f"{part}.{'down' if part == 'encoder' else 'up'}.{i}"
        if kind == "resnets":
            return f"{level}.block.{j}.{_sub(rest, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        part, kind, j, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(j) + 1}.{_sub(rest, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{part}.mid.attn_1.{_sub(rest, _VAE_ATTN)}"
    return re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", key)


def openclip_key(key: str) -> tuple[str, int | None]:
    """diffusers CLIP key -> (OpenCLIP key, slice index into the fused q/k/v or None)."""
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
    if m:
        i, rest = m.groups()
        q = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
        if q:
            return f"transformer.resblocks.{i}.attn.in_proj_{q[2]}", "qkv".index(q[1])
        table = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
        return f"transformer.resblocks.{i}.{_sub(rest, table)}", None
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "text_projection.weight": "text_projection",
    }
    return fixed[key], None


# -- architecture description --


def component_prefix(component: str, arch: str) -> str:
    if component == "text_encoder" and arch == "sdxl":
        return SDXL_TEXT_ENCODER
    return PREFIXES[component]


def text_layout(component: str, arch: str) -> str:
    """ "hf" (transformers names under ``transformer.``) or "openclip" (``model.``)."""
    if component == "text_encoder" and arch in ("sd1", "sd1_inpaint"):
        return "hf"
    if component == "text_encoder" and arch == "sdxl":
        return "hf"
    return "openclip"


def detect_architecture(keys: Iterable[str]) -> str:
    """One of sd1, sd1_inpaint, sd2, sd2_inpaint, sdxl, x4_upscaler, from the key names and U-Net input width.

    SD 2.x v-prediction (768) and epsilon (512-base) checkpoints have identical
    weights; the shipped SD 2.1 config (v-prediction) is used unless a config
    folder says otherwise.
    """
    keys = set(keys)
    if "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys:
        return "sdxl"
    if "cond_stage_model.model.token_embedding.weight" in keys:
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys):
        return "sd1"
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UnsupportedArchitectureError(
            "single file: no 'model.diffusion_model.*' keys, so this is not a Stable Diffusion checkpoint "
            f"(first keys: {sorted(keys)[:5]})"
        )
    raise UnsupportedArchitectureError(
        "single file: U-Net found but no recognised text encoder (cond_stage_model.transformer.*, "
        "cond_stage_model.model.*, conditioner.embedders.*)"
    )


def refine_architecture(arch: str, unet_in_channels: int) -> str:
    if unet_in_channels == 9:
        return {"sd1": "sd1_inpaint", "sd2": "sd2_inpaint"}.get(arch, arch)
    if unet_in_channels == 7 and arch == "sd2":
        return "x4_upscaler"
    return arch


# -- conversions --


def _key_map(component: str, diffusers_keys: Iterable[str], arch: str, unet_shape=None, vae_levels=None):
    """{diffusers key: (original key, slice)} for one component."""
    prefix = component_prefix(component, arch)
    out = {}
    for k in diffusers_keys:
        if component == "unet":
            out[k] = (prefix + unet_key(k, *unet_shape), None)
        elif component == "vae":
            out[k] = (prefix + vae_key(k, vae_levels), None)
        elif text_layout(component, arch) == "hf":
            out[k] = (prefix + "transformer." + k, None)
        else:
            orig, sl = openclip_key(k)
            out[k] = (prefix + "model." + orig, sl)
    return out


def original_to_diffusers(state: Mapping[str, np.ndarray], key_map, *, source: str = "checkpoint"):
    """Pull one component out of a single-file state dict, strictly."""
    out, missing = {}, []
    for dk, (ok, sl) in key_map.items():
        if ok not in state:
            missing.append(f"{ok} (for {dk})")
            continue
        v = np.asarray(state[ok])
        if sl is not None:
            v = np.split(v, 3, axis=0)[sl]
        if ok.endswith("text_projection"):  # OpenCLIP stores x @ P; a Linear weight is P.T
            v = v.T
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ok) and v.ndim == 4:
            v = v[:, :, 0, 0]  # 1x1 convs in the original, Linear in diffusers
        out[dk] = v
    if missing:
        raise MissingParameterError(
            f"{source}: {len(missing)} tensor(s) needed by the model are absent: {sorted(missing)[:20]}"
        )
    return out


def diffusers_to_original(state: Mapping[str, np.ndarray], key_map) -> dict[str, np.ndarray]:
    """The inverse: write a diffusers component into single-file keys (fusing q/k/v)."""
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[int, np.ndarray]] = {}
    for dk, v in state.items():
        ok, sl = key_map[dk]
        v = np.asarray(v)
        if sl is not None:
            fused.setdefault(ok, {})[sl] = v
            continue
        if ok.endswith("text_projection"):
            v = v.T
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ok) and v.ndim == 2:
            v = v[:, :, None, None]
        out[ok] = v
    for ok, parts in fused.items():
        out[ok] = np.concatenate([parts[i] for i in range(3)], axis=0)
    return out


def check_all_used(state: Mapping[str, np.ndarray], key_maps: list, *, source: str) -> list[str]:
    """Every key is either loaded or a known non-parameter; returns the ignored ones, raises on the rest."""
    used = {ok for km in key_maps for ok, _ in km.values()}
    ignored, unknown = [], []
    for k in state:
        if k in used:
            continue
        if IGNORED.match(k) or _is_unused_openclip(k):
            ignored.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise UnexpectedKeyError(
            f"{source}: {len(unknown)} tensor(s) map to no parameter of ours: {sorted(unknown)[:20]}"
        )
    return ignored


def _is_unused_openclip(k: str) -> bool:
    # SD 2.x keeps OpenCLIP's last block and projection, which SD never uses (it takes the penultimate layer).
    return k.startswith("cond_stage_model.model.") and (k.endswith("text_projection") or ".resblocks.23." in k)
