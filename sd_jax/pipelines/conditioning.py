"""What the U-Net is conditioned on, built once for every mode: prompts, negative prompts, SDXL micro-conditioning
and an LCM U-Net's guidance embedding, as diffusers' pipelines build them.

:func:`text_conditioning` returns ``(cond, uncond)``, pytrees with a leading batch axis (``uncond`` None when
there is no classifier-free guidance). The text encoding itself is :func:`sd_jax.components.encode_prompt`, jitted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import components as C


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def negative_list(negative: str | Sequence[str] | None, n: int) -> list[str] | None:
    return [negative] * n if isinstance(negative, str) else negative


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_prompt(comps, text_params, ids, clip_skip):
    return C.encode_prompt(comps, text_params, ids, clip_skip)


def encode(comps: C.Components, params: dict, prompts: Sequence[str], clip_skip: int | None = None) -> dict:
    """Prompts -> the U-Net's text conditioning (``context``; SDXL adds ``text_embeds``)."""
    ids = C.tokenize_prompts(comps, prompts)
    return _encode_prompt(comps, {n: params[n] for n in comps.text_names}, ids, clip_skip or None)


def encode_negative(comps: C.Components, params: dict, negative: Sequence[str] | None, n: int,
                    clip_skip: int | None = None) -> dict:  # fmt: skip
    """The unconditional side of CFG: the negative prompts, or "" (all zeros for SDXL with
    ``force_zeros_for_empty_prompt``)."""
    if negative is None and comps.sdxl and comps.force_zeros_for_empty_prompt:
        return jax.tree.map(jnp.zeros_like, encode(comps, params, [""] * n, clip_skip))
    return encode(comps, params, list(negative) if negative is not None else [""] * n, clip_skip)


def uses_guidance_embedding(comps: C.Components) -> bool:
    """An LCM-distilled U-Net (``time_cond_proj_dim``) takes the guidance scale as an embedding, never CFG."""
    return comps.unet.config.time_cond_proj_dim is not None


def guidance_scale_embedding(w, dim: int) -> np.ndarray:
    """``[B, dim]`` sinusoidal embedding of guidance weights ``w`` (float32), diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` (Luo et al. 2023, LCM, eq. 9)."""
    w = np.asarray(w, np.float32).reshape(-1) * np.float32(1000.0)
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / np.float32(half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def text_conditioning(comps: C.Components, params: dict, prompts: Sequence[str], negative: Sequence[str] | None,
                      guidance_scale: float, height: int, width: int, clip_skip: int | None = None):  # fmt: skip
    """``(cond, uncond or None)`` for ``prompts`` at ``height x width``.

    No ``uncond`` at guidance scale 1 or below, nor for an LCM U-Net, which gets ``timestep_cond``, the embedding of
    ``guidance_scale - 1``, instead (diffusers: ``do_classifier_free_guidance`` is off when ``time_cond_proj_dim``
    is set). SDXL gets ``time_ids``: original size, crop (0, 0), target size.
    """
    n = len(prompts)
    lcm = uses_guidance_embedding(comps)
    cond = encode(comps, params, prompts, clip_skip)
    uncond = encode_negative(comps, params, negative, n, clip_skip) if guidance_scale > 1 and not lcm else None
    if comps.sdxl:
        ids = C.sdxl_time_ids(np.full((n, 2), (height, width)), (0, 0), (height, width))
        cond["time_ids"] = ids
        if uncond is not None:
            uncond["time_ids"] = ids
    if lcm:
        cond["timestep_cond"] = jnp.asarray(
            guidance_scale_embedding(np.full((n,), guidance_scale - 1.0), comps.unet.config.time_cond_proj_dim)
        )
    return cond, uncond
