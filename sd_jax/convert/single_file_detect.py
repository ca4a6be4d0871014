"""What a single-file checkpoint or a set of diffusers configs is: one of :data:`ARCHITECTURES`.

:func:`detect_architecture` reads a file's key names and a few shapes (as diffusers' ``infer_diffusers_model_type``
does); :func:`architecture_of` names the architecture of diffusers config dicts, so that a model is written only in
its own layout (:func:`check_architecture`). Pure Python: nothing here imports a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sd_jax.errors import UnsupportedArchitectureError

ARCHITECTURES = ("sd1", "sd1_inpaint", "sd2", "sd2_inpaint", "sdxl", "sdxl_refiner", "x4_upscaler")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _shape(state, key):
    return tuple(state[key].shape) if key in state else None


def detect_architecture(state: Mapping[str, Any]) -> str:
    """One of ``ARCHITECTURES`` from key names and a few shapes.

    The text encoder's prefix says the family (``cond_stage_model.transformer``:
    SD 1.x CLIP-L, ``cond_stage_model.model``: SD 2.x OpenCLIP,
    ``conditioner.embedders``: SDXL, or with the OpenCLIP ``embedders.0`` alone the SDXL refiner); in a file
    without one, the U-Net's cross-attention width does (768, 1024, 2048). The U-Net's input channels
    say the variant (9: inpainting, 7: x4 upscaler). SD 2.x v-prediction (768-v) and epsilon
    (512-base) checkpoints have identical weights, so like diffusers (which
    maps every SD 2.x file to ``stabilityai/stable-diffusion-2-1``) we load the
    shipped SD 2.1 config, v-prediction; pass ``config_dir`` for an epsilon model.
    """
    keys = list(state)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UnsupportedArchitectureError(
            "single file: no 'model.diffusion_model.*' keys, so this is not a Stable Diffusion checkpoint "
            f"(first keys: {sorted(keys)[:5]})"
        )
    in_shape = _shape(state, "model.diffusion_model.input_blocks.0.0.weight")
    in_ch = in_shape[1] if in_shape else None
    ctx = {
        _shape(state, k)[1] for k in keys if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")
    }
    # The text encoder's key names decide; the cross-attention width only when a file has no text encoder.
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        if in_ch != 4:
            raise UnsupportedArchitectureError(f"single file: an SDXL refiner with {in_ch} U-Net input channels")
        return "sdxl_refiner"  # sd_xl_refiner_1.0: one OpenCLIP bigG conditioner, as diffusers' from_single_file
    if has("conditioner.embedders.1.model.") or (not has("cond_stage_model.") and ctx == {2048}):
        if in_ch != 4:
            raise UnsupportedArchitectureError(f"single file: SDXL with {in_ch} U-Net input channels is not supported")
        return "sdxl"
    if has("cond_stage_model.transformer.") or (not has("cond_stage_model.") and ctx == {768}):
        family = "sd1"
    elif has("cond_stage_model.model.") or (not has("cond_stage_model.") and ctx == {1024}):
        family = "sd2"
    else:
        raise UnsupportedArchitectureError(
            "single file: no known text encoder (cond_stage_model.transformer.*, cond_stage_model.model.*, "
            f"conditioner.embedders.*) and U-Net cross-attention width {sorted(ctx)} is not 768/1024/2048"
        )
    variant = {4: family, 9: f"{family}_inpaint", 7: "x4_upscaler" if family == "sd2" else None}.get(in_ch)
    if variant is None:
        raise UnsupportedArchitectureError(
            f"single file: a {family} U-Net with {in_ch} input channels is not supported "
            "(4: text-to-image, 9: inpainting, 7: SD 2 x4 upscaler)"
        )
    return variant


def architecture_of(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """The one of ``ARCHITECTURES`` a model's diffusers config dicts (by component) describe: SDXL has a second
    text encoder (the refiner that one alone), SD 2.x's OpenCLIP encoder uses ``gelu`` (CLIP-L: ``quick_gelu``),
    and the U-Net's input channels say the variant (9: inpainting, 7: x4 upscaler). Sizes are not used, so tiny
    models are named too."""
    if "text_encoder_2" in configs:
        return "sdxl" if "text_encoder" in configs else "sdxl_refiner"
    family = "sd2" if configs.get("text_encoder", {}).get("hidden_act") == "gelu" else "sd1"
    in_ch = configs.get("unet", {}).get("in_channels", 4)
    return {9: f"{family}_inpaint", 7: "x4_upscaler"}.get(in_ch, family)


def check_architecture(arch: str, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse to write a model in another architecture's single-file layout (nothing could load that file)."""
    have = architecture_of(configs)
    if arch != have:
        raise UnsupportedArchitectureError(
            f"single file: the model is {have}, but {arch} was asked for; its weights do not fit the {arch} layout "
            f"(pass --single-file {have})"
        )
