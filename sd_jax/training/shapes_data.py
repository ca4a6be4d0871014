"""Training batches from the "shapes" TFDS data set (array_record files read through grain, no TensorFlow).

The data set is prepared once into ``data.data_dir`` (default ``~/.cache/sd_jax/tfds``). Batches are a
pure function of (seed, step, example slot), so resuming and multi-host splits see the same examples.
"""

from __future__ import annotations

import pathlib

import grain.python as grain
import numpy as np

from sd_jax.datasets import shapes
from sd_jax.tokenizer import tokenize

DEFAULT_DATA_DIR = pathlib.Path("~/.cache/sd_jax/tfds").expanduser()


class ShapesData:
    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer, self.skipped, self.prepared_skipped = cfg, tokenizer, 0, 0
        sizes = {"num_train": cfg.get("num_train", 50_000)}
        b = shapes.prepare(pathlib.Path(cfg.get("data_dir") or DEFAULT_DATA_DIR), **sizes)
        self.examples = grain.MapDataset.source(b.as_data_source()[cfg.get("split", "train")])

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        """Examples ``offset .. offset + batch_size`` of the global batch at ``step``."""
        cfg = self.cfg
        images, captions = [], []
        for idx in range(offset, offset + batch_size):
            rng = np.random.default_rng([cfg.seed, step, idx])
            ex = self.examples[int(rng.integers(len(self.examples)))]
            img = np.asarray(ex["image"], np.float32) / 127.5 - 1.0
            if cfg.random_flip and rng.random() < 0.5:
                img = img[:, ::-1]  # a mirrored shape keeps its class
            images.append(img)
            text = ex["text"].decode() if isinstance(ex["text"], bytes) else str(ex["text"])
            captions.append("" if rng.random() < cfg.caption_dropout else text)
        return {"images": np.stack(images), "input_ids": tokenize(self.tokenizer, captions)}
