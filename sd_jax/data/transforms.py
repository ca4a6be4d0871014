"""Image transforms shared by every pixel source: resize the short side, crop a square, maybe flip."""

from __future__ import annotations

import numpy as np
from PIL import Image


def preprocess(img: Image.Image, size: int, rng: np.random.Generator, *, random_crop=False, random_flip=True,
               with_crop=False):  # fmt: skip
    """Resize the short side to ``size``, crop a square (center or random), maybe flip; [-1, 1] float32 HWC.

    ``with_crop``: also return the original ``(h, w)`` and the crop's ``(top, left)`` in the resized (and, when
    flipped, mirrored) image: SDXL's micro-conditioning, as diffusers' ``train_text_to_image_sdxl.py`` records it.
    """
    img = img.convert("RGB")
    w, h = img.size
    original_size = (h, w)
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left = rng.integers(0, w - size + 1) if random_crop else (w - size) // 2
    top = rng.integers(0, h - size + 1) if random_crop else (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 127.5 - 1.0
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
        left = w - size - left  # the same crop, measured in the mirrored image
    return (arr, original_size, (int(top), int(left))) if with_crop else arr
