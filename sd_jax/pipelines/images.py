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


def _open(path_or_image) -> Image.Image:
    """A PIL image; 16- and 32-bit grayscale ("I;16", "I", "F") scaled to 8 bits, not clipped at 255."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, np.float64)
        peak = 1.0 if img.mode == "F" and a.max() <= 1.0 else (65535.0 if a.max() <= 65535 else float(a.max()))
        img = Image.fromarray((np.clip(a / peak, 0.0, 1.0) * 255).round().astype(np.uint8), "L")
    return img


def fit(img: Image.Image, size: tuple[int, int], mode: str = "resize", resample=Image.LANCZOS) -> Image.Image:
    """``img`` at ``size`` (width, height): stretched (``resize``), or scaled to cover and center-cropped
    (``crop``; A1111's "crop and resize")."""
    size = tuple(size)
    if img.size == size:
        return img
    if mode == "resize":
        return img.resize(size, resample)
    if mode != "crop":
        raise ValueError(f"resize mode {mode!r} is not 'resize' or 'crop'")
    scale = max(size[0] / img.size[0], size[1] / img.size[1])
    cover = (max(size[0], round(img.size[0] * scale)), max(size[1], round(img.size[1] * scale)))
    img = img.resize(cover, resample) if cover != img.size else img
    left, top = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
    return img.crop((left, top, left + size[0], top + size[1]))


def fitted_size(size: tuple[int, int], target: tuple[int | None, int | None], multiple: int) -> tuple[int, int]:
    """The (width, height) an input image of ``size`` is fitted to: ``target`` where given, the rest of the
    image's own size, each rounded down to ``multiple`` (diffusers' ``VaeImageProcessor`` rounds down too)."""
    return tuple(max(multiple, (t or s) // multiple * multiple) for s, t in zip(size, target))


def image_size(path_or_image) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return img.size


def load_image(path_or_image, size: tuple[int, int] | None = None, mode: str = "resize") -> np.ndarray:
    """An RGB image as [H, W, 3] float32 in [0, 1]; ``size`` = (width, height) fits it (see :func:`fit`)."""
    img = _open(path_or_image).convert("RGB")
    if size is not None:
        img = fit(img, size, mode)
    return np.asarray(img, np.float32) / 255.0


def load_mask(path_or_image, size: tuple[int, int] | None = None, mode: str = "resize") -> np.ndarray:
    """A mask as [H, W, 1] float32 in [0, 1]; white = repaint. Fitted with nearest-neighbour sampling."""
    img = _open(path_or_image).convert("L")
    if size is not None:
        img = fit(img, size, mode, Image.NEAREST)
    return (np.asarray(img, np.float32) / 255.0)[..., None]


def resize_array(a: np.ndarray, size: tuple[int, int], resample=Image.LANCZOS) -> np.ndarray:
    """[H, W, C] floats in [0, 1] resized to ``size`` = (width, height), channel by channel, without 8-bit
    rounding; clipped to [0, 1] (Lanczos overshoots)."""
    if a.shape[1::-1] == tuple(size):
        return np.asarray(a, np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c], np.float32), "F").resize(size, resample))
             for c in range(a.shape[-1])]  # fmt: skip
    return np.clip(np.stack(chans, -1), 0.0, 1.0)


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
