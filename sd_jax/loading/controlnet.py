"""Load ControlNets as users have them: a diffusers folder (or Hub id) holding ``ControlNetModel``."""

from __future__ import annotations

import os

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.loading.diffusers import load_component, resolve
from sd_jax.models.controlnet import ControlNetConfig


def load_controlnet(path_or_id: os.PathLike | str, *, dtype=None, allow_pickle: bool = False):
    """``(ControlNetConfig, params)`` from a diffusers ControlNet folder or Hub id."""
    folder = resolve(path_or_id)
    config, params = load_component(folder, dtype=dtype, allow_pickle=allow_pickle)
    if not isinstance(config, ControlNetConfig):
        raise UnsupportedArchitectureError(
            f"{folder}: config.json describes a {type(config).__name__}, not a ControlNetModel"
        )
    return config, params


def check_base(config: ControlNetConfig, unet_config, where: str) -> None:
    """A ControlNet built for another base (text width, SDXL or not, latent channels) is refused by name."""
    u = config.unet
    for what, mine, theirs in (
        ("cross_attention_dim", u.cross_attention_dim, unet_config.cross_attention_dim),
        ("addition_embed_type", u.addition_embed_type, unet_config.addition_embed_type),
        ("block_out_channels", u.block_out_channels, unet_config.block_out_channels),
    ):
        if mine != theirs:
            raise UnsupportedArchitectureError(
                f"{where}: ControlNet {what}={mine!r} but the model's U-Net has {theirs!r}; "
                "this ControlNet was trained for another base model"
            )

