"""What the U-Net is conditioned on, built once for every mode: prompts, negative prompts, SDXL micro-conditioning
and an LCM U-Net's guidance embedding, as diffusers' pipelines build them.

:func:`text_conditioning` returns ``(cond, uncond)``, pytrees with a leading batch axis (``uncond`` None when
there is no classifier-free guidance). Prompts are encoded the AUTOMATIC1111 way (:mod:`sd_jax.pipelines.long_prompts`):
any length, in chunks of 75 tokens, with ``(word:1.2)`` weighting applied by ``emphasis`` ("a1111", "comfy" or
"none"); the prompt and its negative are padded to one chunk count. Each chunk is encoded by
:func:`sd_jax.components.encode_prompt`, jitted; a short unweighted prompt encodes exactly as diffusers'.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import components as C
from sd_jax.pipelines import long_prompts as LP


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def negative_list(negative: str | Sequence[str] | None, n: int) -> list[str] | None:
    return [negative] * n if isinstance(negative, str) else negative


def _chunks(comps, prompts, max_chunks, min_chunks=1):
    return LP.tokenize_chunks(comps, list(prompts), max_chunks, min_chunks)


def _negative_chunks(comps, negative, n, max_chunks, min_chunks):
    return _chunks(comps, list(negative) if negative is not None else [""] * n, max_chunks, min_chunks)


def _encode_negative_chunks(comps, params, negative, chunks, clip_skip, emphasis) -> dict:
    out = LP.encode_chunks(comps, params, chunks, clip_skip, emphasis)
    if negative is None and comps.sdxl and comps.force_zeros_for_empty_prompt:
        return jax.tree.map(jnp.zeros_like, out)
    return out


def encode(comps: C.Components, params: dict, prompts: Sequence[str], clip_skip: int | None = None, *,
           emphasis: str = "a1111", max_chunks: int = LP.MAX_CHUNKS, min_chunks: int = 1) -> dict:  # fmt: skip
    """Prompts -> the U-Net's text conditioning (``context`` ``[B, chunks * 77, D]``; SDXL adds ``text_embeds``),
    at least ``min_chunks`` chunks long."""
    chunks = _chunks(comps, prompts, max_chunks, min_chunks)
    return LP.encode_chunks(comps, params, chunks, clip_skip, emphasis)


def encode_negative(comps: C.Components, params: dict, negative: Sequence[str] | None, n: int,
                    clip_skip: int | None = None, *, emphasis: str = "a1111", max_chunks: int = LP.MAX_CHUNKS,
                    min_chunks: int = 1) -> dict:  # fmt: skip
    """The unconditional side of CFG: the negative prompts, or "" (all zeros for SDXL with
    ``force_zeros_for_empty_prompt``)."""
    chunks = _negative_chunks(comps, negative, n, max_chunks, min_chunks)
    return _encode_negative_chunks(comps, params, negative, chunks, clip_skip, emphasis)


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
                      guidance_scale: float, height: int, width: int, clip_skip: int | None = None, *,
                      emphasis: str = "a1111", max_chunks: int = LP.MAX_CHUNKS):  # fmt: skip
    """``(cond, uncond or None)`` for ``prompts`` at ``height x width``; ``emphasis`` and ``max_chunks`` as
    :mod:`sd_jax.pipelines.long_prompts` (the pipeline passes ``pipe.emphasis`` and ``pipe.max_prompt_chunks``).

    No ``uncond`` at guidance scale 1 or below, nor for an LCM U-Net, which gets ``timestep_cond``, the embedding of
    ``guidance_scale - 1``, instead (diffusers: ``do_classifier_free_guidance`` is off when ``time_cond_proj_dim``
    is set). SDXL gets ``time_ids``: original size, crop (0, 0), target size.
    """
    n = len(prompts)
    lcm = uses_guidance_embedding(comps)
    LP.check_emphasis(emphasis)
    pos = _chunks(comps, prompts, max_chunks)
    neg = _negative_chunks(comps, negative, n, max_chunks, 1) if guidance_scale > 1 and not lcm else None
    count = max(pos[0].count, neg[0].count if neg else 0)  # the prompt and its negative: one chunk count
    pos = [LP.pad_chunks(c, tok, count) for c, tok in zip(pos, comps.tokenizers)]
    cond = LP.encode_chunks(comps, params, pos, clip_skip, emphasis)
    uncond = None
    if neg is not None:
        neg = [LP.pad_chunks(c, tok, count) for c, tok in zip(neg, comps.tokenizers)]
        uncond = _encode_negative_chunks(comps, params, negative, neg, clip_skip, emphasis)
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
