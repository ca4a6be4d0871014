"""Conditioning images for ControlNet training, made in the input pipeline (``data.control``).

- ``"column"``: the data set has them, in the feature ``data.control_key`` (cropped and flipped with the image);
- ``"canny"``: edges of the training image (:func:`sd_jax.control_image.canny`, A1111's 100/200 thresholds);
- ``"silhouette"``: "shapes" data only: white where the shape is, black elsewhere (from the known background).

Every kind gives float32 ``[S, S, 3]`` in [0, 1], the batch's ``control`` key (:mod:`sd_jax.data.schema`).
"""

from __future__ import annotations

import numpy as np

KINDS = ("", "column", "canny", "silhouette")


def check(cfg) -> str:
    """The ``data.control`` kind, refused by name when unknown or when it cannot apply to ``data.source``."""
    kind = cfg.get("control") or ""
    if kind not in KINDS:
        raise ValueError(f"data.control={kind!r} is not one of {[k for k in KINDS if k]}")
    if kind == "silhouette" and cfg.get("source") != "shapes":
        raise ValueError(f"data.control='silhouette' needs data.source='shapes' (got {cfg.get('source')!r})")
    if kind == "column" and not cfg.get("control_key"):
        raise ValueError("data.control='column' needs data.control_key, the data set's conditioning-image feature")
    return kind


def to_unit(image) -> np.ndarray:
    """[-1, 1] float (a training image) -> [0, 1] float32."""
    return np.clip((np.asarray(image, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def canny_of(image) -> np.ndarray:
    """Edges of a [-1, 1] training image."""
    from sd_jax.control_image import canny

    return np.asarray(canny((to_unit(image) * 255).round().astype(np.uint8)), np.float32)


def silhouette(image, background) -> np.ndarray:
    """Where a [-1, 1] image differs from its uniform ``background`` (RGB 0-255) by over half the largest gap."""
    rgb = to_unit(image) * 255.0
    dist = np.abs(rgb - np.asarray(background, np.float32)).sum(-1)
    mask = (dist > 0.5 * dist.max()).astype(np.float32) if dist.max() > 0 else np.zeros(dist.shape, np.float32)
    return np.repeat(mask[..., None], 3, axis=-1)
