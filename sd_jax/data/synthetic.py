"""A synthetic smoke-test set: smooth random colour fields, captioned by their dominant colour."""

from __future__ import annotations

import numpy as np

import sd_jax.data.schema as schema
from sd_jax.data.source import Source
from sd_jax.tokenizer import tokenize


class SyntheticSource(Source):
    """Smooth random colour fields with captions naming their dominant colour: a learnable smoke-test set."""

    COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "white": (0.95, 0.95, 0.95)}

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer, self.skipped, self.prepared_skipped = cfg, tokenizer, 0, 0

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
        sizes, crops = np.full((batch_size, 2), s), np.zeros((batch_size, 2))  # uncropped, at the model's size
        return schema.pixels(np.stack(images), tokenize(self.tokenizer, captions), original_size=sizes,
                             crop_top_left=crops)  # fmt: skip
