"""DreamBooth data (Ruiz et al. 2023): instance images with one prompt naming a rare token ("a photo of sks dog"),
plus, for prior preservation, class images ("a photo of a dog") generated beforehand by the frozen model
(``sd_jax.training.dreambooth.prepare_class_images``).

Batches are a pure function of (seed, step, process): ``n`` instance rows, then (with prior preservation) ``n``
class rows and a ``prior_mask`` marking them, which the diffusion loss turns into
``instance_loss + prior_loss_weight * prior_loss``.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from PIL import Image

import sd_jax.data.schema as schema
from sd_jax.data.folder import scan_folder
from sd_jax.data.source import Source
from sd_jax.data.transforms import preprocess
from sd_jax.tokenizer import tokenize


def _images(folder, what: str) -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"DreamBooth {what} folder {folder}: no such folder")
    return [p for p, _ in scan_folder(folder)]


class DreamBoothSource(Source):
    """Instance images with ``instance_prompt``; with ``with_prior_preservation``, as many class images too."""

    def __init__(self, cfg, tokenizer, *, process_index: int | None = None, process_count: int | None = None):
        self.cfg = cfg
        self.process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        shard = slice(self.process_index, None, process_count)
        self.instance = _images(cfg.path, "instance")[shard]
        if not self.instance:
            raise ValueError(f"{cfg.path}: no instance images found for process {self.process_index}")
        self.instance_ids = tokenize(tokenizer, [cfg.instance_prompt])[0]
        self.prior = bool(cfg.with_prior_preservation)
        if self.prior:
            self.classes = _images(cfg.class_path, "class")[shard]
            if not self.classes:
                raise ValueError(f"{cfg.class_path}: no class images found for process {self.process_index}")
            self.class_ids = tokenize(tokenizer, [cfg.class_prompt])[0]
        self.skipped = self.prepared_skipped = 0  # read straight from the folders: nothing is prepared

    def _draw(self, items, n, rng):
        out = []
        while len(out) < n:
            path = items[rng.integers(len(items))]
            try:
                with Image.open(path) as im:
                    out.append(preprocess(im, self.cfg.image_size, rng, random_crop=self.cfg.random_crop,
                                          random_flip=self.cfg.random_flip))  # fmt: skip
            except (OSError, ValueError):
                self.skipped += 1
                if self.skipped > 100 * max(n, 1):
                    raise ValueError(f"DreamBooth: no readable image among {len(items)} files") from None
        return out

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        """This host's ``batch_size`` instance rows (then as many class rows) at ``step``; ``offset`` is unused."""
        rng = np.random.default_rng([self.cfg.seed, step, self.process_index])
        images = self._draw(self.instance, batch_size, rng)
        ids = [self.instance_ids] * batch_size
        if not self.prior:
            return schema.pixels(np.stack(images), np.stack(ids))
        images += self._draw(self.classes, batch_size, rng)
        ids += [self.class_ids] * batch_size
        return schema.pixels(np.stack(images), np.stack(ids), prior_mask=[0.0] * batch_size + [1.0] * batch_size)
