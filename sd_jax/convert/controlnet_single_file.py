"""Single-file ControlNets in the original layout (lllyasviel's ``cldm``) <-> diffusers ``ControlNetModel`` keys.

ControlNet 1.0/1.1 files and SDXL community ControlNets trained with the
original code name the U-Net encoder copy as the LDM U-Net does
(``time_embed.*``, ``label_emb.*``, ``input_blocks.*``, ``middle_block.*``) and
add the hint encoder ``input_hint_block.{0,2,...,14}`` (its SiLUs take the odd
indices), one zero convolution per skip ``zero_convs.N.0`` and
``middle_block_out.0``. Keys sit under ``control_model.`` (the ``cldm``
checkpoint, sometimes with the whole SD model beside it) or under no prefix
(extracted files such as thibaud/controlnet-sd21). Some single files carry
diffusers names already; those pass through.

The map matches ``diffusers.loaders.single_file_utils.convert_controlnet_checkpoint``;
unlike it, it is strict: a key that maps nowhere or a parameter left unfilled raises,
listing the keys. The U-Net part reuses ``single_file.unet_keys``. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_jax.convert import single_file as sf
from sd_jax.errors import MissingParameterError, UnexpectedKeyError, UnsupportedArchitectureError

PREFIX = "control_model."
# Diffusers U-Net keys a ControlNet does not have (it copies the encoder half only).
_NOT_IN_CONTROLNET = ("up_blocks.", "conv_norm_out.", "conv_out.")
# A key only a diffusers-named ControlNet has.
DIFFUSERS_MARKERS = ("controlnet_cond_embedding.conv_in.weight", "time_embedding.linear_1.weight")
_WB = ("weight", "bias")
# Cross-attention width -> the shipped ControlNet config of that base (sd_jax/model_configs/<name>).
BASES = {768: "controlnet_sd15", 1024: "controlnet_sd21", 2048: "controlnet_sdxl"}


def hint_keys(levels: int) -> dict[str, str]:
    """{diffusers key: original key} of the hint encoder with ``levels`` channel widths.

    The original is one ``nn.Sequential``: conv_in at 0, then (conv, stride-2 conv) per level step,
    every conv followed by a SiLU, and the zero conv_out last (index 14 for the usual 4 levels).
    """
    blocks = 2 * (levels - 1)
    out = {f"controlnet_cond_embedding.conv_in.{wb}": f"input_hint_block.0.{wb}" for wb in _WB}
    for i in range(blocks):
        out.update({f"controlnet_cond_embedding.blocks.{i}.{wb}": f"input_hint_block.{2 * i + 2}.{wb}" for wb in _WB})
    out.update({f"controlnet_cond_embedding.conv_out.{wb}": f"input_hint_block.{2 * blocks + 2}.{wb}" for wb in _WB})
    return out


def controlnet_keys(config) -> dict[str, str]:
    """{diffusers key: original key, unprefixed} of a ``ControlNetConfig``."""
    out = {k: v for k, v in sf.unet_keys(config.unet).items() if not k.startswith(_NOT_IN_CONTROLNET)}
    out.update(hint_keys(len(config.conditioning_embedding_out_channels)))
    for i in range(config.num_residuals):
        out.update({f"controlnet_down_blocks.{i}.{wb}": f"zero_convs.{i}.0.{wb}" for wb in _WB})
    out.update({f"controlnet_mid_block.{wb}": f"middle_block_out.0.{wb}" for wb in _WB})
    return out


def is_diffusers_layout(state: Mapping[str, Any]) -> bool:
    return any(k in state for k in DIFFUSERS_MARKERS)


def split_controlnet(state: Mapping[str, Any], source: str = "single file") -> tuple[dict[str, Any], list[str]]:
    """``(the ControlNet's tensors, unprefixed; keys skipped)``.

    With a ``control_model.`` prefix, the rest of a ControlNet 1.0 file (the whole SD model under
    ``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.``, schedule buffers) is skipped,
    as diffusers skips it; any other key raises. Without the prefix every key is the ControlNet's.
    """
    if not any(k.startswith(PREFIX) for k in state):
        return dict(state), []
    mine, skipped, unknown = {}, [], []
    known = tuple(p for p, _ in sf.PREFIXES)
    for k, v in state.items():
        if k.startswith(PREFIX):
            mine[k[len(PREFIX) :]] = v
        elif k.startswith(known) or sf.IGNORED.match(k):
            skipped.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise UnexpectedKeyError(
            f"{source}: {len(unknown)} tensor(s) under neither 'control_model.' nor a Stable Diffusion prefix:"
            f"{sf._fmt(unknown)}"
        )
    return mine, sorted(skipped)


def _shape(state, *keys):
    return next((tuple(state[k].shape) for k in keys if k in state), None)


def infer_base(state: Mapping[str, Any], source: str = "single file") -> str:
    """The shipped config (``controlnet_sd15`` / ``_sd21`` / ``_sdxl``) of an unprefixed ControlNet state dict.

    The cross-attention width names the base (768: SD 1.x, 1024: SD 2.x, 2048: SDXL), as
    ``single_file.detect_architecture`` does for a whole model; SDXL also needs its ``text_time`` embedding.
    """
    widths = {tuple(v.shape)[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")}
    sdxl_emb = any(k.startswith(("label_emb.0.", "add_embedding.")) for k in state)
    name = BASES.get(next(iter(widths))) if len(widths) == 1 else None
    if name is None or (name == "controlnet_sdxl") != sdxl_emb:
        raise UnsupportedArchitectureError(
            f"{source}: cannot tell the base model of this ControlNet (cross-attention widths {sorted(widths)}, "
            f"SDXL time embedding {'present' if sdxl_emb else 'absent'}; shipped: 768 SD 1.x, 1024 SD 2.x, "
            "2048 SDXL) ; pass config= a diffusers ControlNet folder or config.json describing it"
        )
    return name


def conditioning_channels(state: Mapping[str, Any]) -> int | None:
    """Input channels of the hint encoder (3 for RGB control images), from either layout."""
    shape = _shape(state, "input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight")
    return shape[1] if shape else None


def original_to_diffusers(
    state: Mapping[str, Any], config, *, source: str = "single file", prefix: str = ""
) -> dict[str, np.ndarray]:
    """Unprefixed original-layout tensors -> a diffusers ``ControlNetModel`` state dict, strictly.

    ``prefix`` (the one the file had) only puts the file's own key names into error messages.
    """
    km = controlnet_keys(config)
    inverse = {v: k for k, v in km.items()}
    unknown = sorted(prefix + k for k in set(state) - set(inverse))
    if unknown:
        raise UnexpectedKeyError(
            f"{source}: {len(unknown)} tensor(s) map to no parameter of this ControlNet config (wrong config, "
            f"or not an original-layout ControlNet?):{sf._fmt(unknown)}"
        )
    missing = [f"{prefix}{ok} (diffusers {dk})" for dk, ok in km.items() if ok not in state]
    if missing:
        raise MissingParameterError(
            f"{source}: {len(missing)} tensor(s) this ControlNet config needs are absent:{sf._fmt(missing)}"
        )
    return {inverse[k]: np.asarray(v) for k, v in state.items()}


def diffusers_to_original(state: Mapping[str, Any], config, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """The inverse, with ``prefix`` (``control_model.`` as lllyasviel's files, or ``""``) on every key."""
    km = controlnet_keys(config)
    unknown = sorted(set(state) - set(km))
    if unknown:
        raise UnexpectedKeyError(f"ControlNet: {len(unknown)} key(s) have no original name:{sf._fmt(unknown)}")
    missing = sorted(set(km) - set(state))
    if missing:
        raise MissingParameterError(f"ControlNet: {len(missing)} key(s) the original layout needs:{sf._fmt(missing)}")
    return {prefix + km[k]: np.asarray(v) for k, v in state.items()}
