"""Pixels in and out: [0, 1] float NHWC arrays, PNG files, grids and animated GIFs (Pillow)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_model_range(images: np.ndarray) -> np.ndarray:
    """[0, 1] pixels -> the VAE's [-1, 1] input."""
    return np.asarray(images, np.float32) * 2.0 - 1.0


def from_model_range(x) -> np.ndarray:
    """The VAE's output -> [0, 1] pixels, clipped, as diffusers' ``VaeImageProcessor.postprocess``."""
    return np.clip(np.asarray(x, np.float32) / 2.0 + 0.5, 0.0, 1.0)


def load_image(path_or_image, size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB image as [H, W, 3] float32 in [0, 1]; ``size`` = (width, height) resizes with Lanczos."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    img = img.convert("RGB")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.LANCZOS)
    return np.asarray(img, np.float32) / 255.0


def load_mask(path_or_image, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask as [H, W, 1] float32 in [0, 1]; white = repaint."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    img = img.convert("L")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.NEAREST)
    return (np.asarray(img, np.float32) / 255.0)[..., None]


def to_uint8(images) -> np.ndarray:
    """[0, 1] floats -> uint8 with rounding, as diffusers' ``numpy_to_pil``."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def save_images(images, out_dir: os.PathLike | str, prefix: str = "image") -> list[pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(images)):
        p = out / f"{prefix}_{i:04d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def make_grid(images, rows: int) -> np.ndarray:
    """[N, H, W, C] -> one [rows*H, cols*W, C] image (row-major)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = -(-n // rows)
    pad = rows * cols - n
    if pad:
        images = np.concatenate([images, np.ones((pad, h, w, c), images.dtype)])
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_gif(frames: Sequence[np.ndarray], path: os.PathLike | str, duration_ms: int = 100) -> pathlib.Path:
    """An animated, looping GIF of [H, W, 3] frames in [0, 1]."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = [Image.fromarray(f) for f in to_uint8(np.asarray(frames))]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)
    return path
