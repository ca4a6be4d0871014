"""Training batches from the "shapes" set (:mod:`sd_jax.data.shapes`), read through :class:`TfdsSource`.

The set is prepared once into ``data.data_dir`` (default ``~/.cache/sd_jax/tfds``). Unlike a folder, examples are
drawn with replacement by a generator of (seed, step, global example slot), not from per-host shuffled shards:
the embedded model was trained on exactly these batches, so they stay as they were.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image

import sd_jax.data.control as control
import sd_jax.data.schema as schema
import sd_jax.data.shapes as shapes
from sd_jax.data.tfds import TfdsSource, get_field
from sd_jax.tokenizer import tokenize

DEFAULT_DATA_DIR = pathlib.Path("~/.cache/sd_jax/tfds").expanduser()


class ShapesSource(TfdsSource):
    """``data.num_train`` shapes (prepared on first use); slices of a global batch (``offset``), as synthetic."""

    def __init__(self, cfg, tokenizer):
        builder = shapes.prepare(pathlib.Path(cfg.get("data_dir") or DEFAULT_DATA_DIR),
                                 num_train=cfg.get("num_train", 50_000))  # fmt: skip
        super().__init__(builder, cfg, tokenizer, process_index=0, process_count=1)  # every host sees every record

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        """Examples ``offset .. offset + batch_size`` of the global batch at ``step``."""
        cfg = self.cfg
        kind = control.check(cfg)
        images, captions, controls = [], [], []
        for idx in range(offset, offset + batch_size):
            rng = np.random.default_rng([cfg.seed, step, idx])
            record = self.records[int(rng.integers(len(self.records)))]
            with Image.open(io.BytesIO(get_field(record, self.image_key))) as im:
                img = np.asarray(im, np.float32) / 127.5 - 1.0  # stored at the model's size: no resize
            if cfg.random_flip and rng.random() < 0.5:
                img = img[:, ::-1]  # a mirrored shape keeps its class
            images.append(img)
            captions.append(self.caption(record) if self.keep_caption(rng) else "")
            if kind == "silhouette":
                controls.append(control.silhouette(img, shapes.PALETTE[shapes.COLORS[int(record["background"])]]))
            elif kind == "canny":
                controls.append(control.canny_of(img))
        return schema.pixels(np.stack(images), tokenize(self.tokenizer, captions),
                             control=np.stack(controls) if controls else None)  # fmt: skip
