"""The one batch schema: the keys a training loss may see, and which kind of batch it is.

A batch is a dict of numpy arrays (leading axis: examples) of one of two kinds:

- ``pixels`` (:data:`PIXEL_KEYS`): ``images`` float32 ``[B, S, S, 3]`` in [-1, 1] and ``input_ids`` int32
  ``[B, T]``; for SDXL optionally :data:`SDXL_KEYS`: ``input_ids_2`` int32 ``[B, T]`` (the second tokenizer's ids),
  ``original_size`` and ``crop_top_left`` int32 ``[B, 2]`` (micro-conditioning);
- ``latents`` (:data:`LATENT_KEYS`, from the latent cache): ``latent_mean`` and ``latent_logvar`` float32
  ``[B, h, w, c]`` (the VAE posterior) and ``context`` float32 ``[B, T, D]`` (the frozen text encoder's output).

Either kind may carry ``prior_mask`` float32 ``[B]`` (DreamBooth: 1 for a class-image row) and ``control``
float32 ``[B, S, S, C]`` in [0, 1] (ControlNet training: the conditioning image, at pixel size). The loss asks
:func:`kind` (or :func:`has_latents`) instead of probing for keys; sources build batches with :func:`pixels` and
:func:`latents`. Only keys are inspected, so these work on traced arrays inside ``jit`` too.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PIXELS, LATENTS = "pixels", "latents"
PIXEL_KEYS = ("images", "input_ids")
SDXL_KEYS = ("input_ids_2", "original_size", "crop_top_left")
LATENT_KEYS = ("latent_mean", "latent_logvar", "context")
OPTIONAL_KEYS = ("prior_mask", "control")
KEYS = {PIXELS: PIXEL_KEYS + SDXL_KEYS + OPTIONAL_KEYS, LATENTS: LATENT_KEYS + OPTIONAL_KEYS}


class BatchError(ValueError):
    """A batch whose keys fit neither kind of :data:`KEYS`."""


def kind(batch: Mapping) -> str:
    """:data:`PIXELS` or :data:`LATENTS`; raises :class:`BatchError` for a batch that is neither, or has keys of
    the other kind or unknown ones."""
    keys = set(batch)
    k = LATENTS if keys & set(LATENT_KEYS) else PIXELS
    need = LATENT_KEYS if k == LATENTS else PIXEL_KEYS
    missing, unknown = [n for n in need if n not in keys], sorted(keys - set(KEYS[k]))
    if missing or unknown:
        raise BatchError(f"a {k} batch needs {list(need)} (optional {[n for n in KEYS[k] if n not in need]}); "
                         f"this one has {sorted(keys)}: missing {missing}, not allowed {unknown}")  # fmt: skip
    return k


def has_latents(batch: Mapping) -> bool:
    """True for a batch from the latent cache: the loss skips the VAE encoder and the text encoder."""
    return kind(batch) == LATENTS


def pixels(images, input_ids, *, original_size=None, crop_top_left=None, prior_mask=None, control=None) -> dict:
    """A pixel batch with the schema's dtypes (optional keys only when given)."""
    out = {"images": np.asarray(images, np.float32), "input_ids": np.asarray(input_ids, np.int32)}
    for name, value, dtype in (("original_size", original_size, np.int32), ("crop_top_left", crop_top_left, np.int32),
                               ("prior_mask", prior_mask, np.float32), ("control", control, np.float32)):  # fmt: skip
        if value is not None:
            out[name] = np.asarray(value, dtype)
    return out


def latents(latent_mean, latent_logvar, context, *, prior_mask=None) -> dict:
    """A latent-cache batch with the schema's dtypes."""
    out = {"latent_mean": np.asarray(latent_mean, np.float32), "latent_logvar": np.asarray(latent_logvar, np.float32),
           "context": np.asarray(context, np.float32)}  # fmt: skip
    if prior_mask is not None:
        out["prior_mask"] = np.asarray(prior_mask, np.float32)
    return out
