"""Training data: image folders with captions, and a synthetic source for smoke tests.

Batches are a pure function of (seed, step, process): resuming at step k gives
exactly the batches an uninterrupted run would have seen, and each host reads
only its own shard of the files.

Folder layouts accepted (as users already have them): ``metadata.jsonl`` lines
with ``file_name`` and ``text``, or ``name.txt`` beside each ``name.png/jpg``.
Unreadable images are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from PIL import Image

from sd_jax.tokenizer import tokenize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def scan_folder(root: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    root = pathlib.Path(root)
    meta = root / "metadata.jsonl"
    if meta.exists():
        items = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                items.append((root / rec["file_name"], str(rec.get("text", ""))))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{meta}:{n}: needs JSON with 'file_name' and 'text' ({e})") from None
        return items
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "") for p in files]


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


class FolderData:
    """Deterministic batches from an image folder; this host's shard only."""

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        items = scan_folder(cfg.path)
        self.items = items[jax.process_index() :: jax.process_count()]
        if not self.items:
            raise ValueError(f"{cfg.path}: no images found for process {jax.process_index()}")
        self.tokenizer = tokenizer
        self.skipped = 0

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step, jax.process_index()])
        images, captions, sizes, crops = [], [], [], []
        while len(images) < batch_size:
            path, text = self.items[rng.integers(len(self.items))]
            try:
                with Image.open(path) as im:
                    arr, original_size, crop = preprocess(im, cfg.image_size, rng, random_crop=cfg.random_crop,
                                                          random_flip=cfg.random_flip, with_crop=True)  # fmt: skip
            except (OSError, ValueError):
                self.skipped += 1
                continue
            images.append(arr)
            sizes.append(original_size)
            crops.append(crop)
            captions.append("" if rng.random() < cfg.caption_dropout else text)
        return {"images": np.stack(images), "input_ids": tokenize(self.tokenizer, captions),
                "original_size": np.asarray(sizes, np.int32), "crop_top_left": np.asarray(crops, np.int32)}  # fmt: skip


class SyntheticData:
    """Smooth random colour fields with captions naming their dominant colour: a learnable smoke-test set."""

    COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "white": (0.95, 0.95, 0.95)}

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer, self.skipped = cfg, tokenizer, 0

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        """Examples ``offset .. offset + batch_size`` of the global batch at ``step``: the same numbers whether
        one process draws the whole batch or several processes draw their slices."""
        cfg = self.cfg
        names = list(self.COLORS)
        s = cfg.image_size
        yy, xx = np.mgrid[0:s, 0:s] / s
        images, captions = [], []
        for idx in range(offset, offset + batch_size):
            rng = np.random.default_rng([cfg.seed, step, idx])
            k = rng.integers(len(names))
            base = np.asarray(self.COLORS[names[k]], np.float32)
            wave = 0.1 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2)))[..., None]
            images.append(np.clip(base + wave, 0, 1) * 2 - 1)
            captions.append("" if rng.random() < cfg.caption_dropout else f"a {names[k]} picture")
        return {"images": np.stack(images).astype(np.float32), "input_ids": tokenize(self.tokenizer, captions),
                "original_size": np.full((batch_size, 2), s, np.int32),
                "crop_top_left": np.zeros((batch_size, 2), np.int32)}  # fmt: skip


def make_source(cfg, tokenizer):
    if cfg.source == "synthetic":
        return SyntheticData(cfg, tokenizer)
    if cfg.source == "folder":
        return FolderData(cfg, tokenizer)
    if cfg.source == "shapes":
        from sd_jax.training.shapes_data import ShapesData

        return ShapesData(cfg, tokenizer)
    raise ValueError(f"data.source must be 'synthetic', 'folder' or 'shapes', got {cfg.source!r}")
