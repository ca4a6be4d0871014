"""Training data: the source named by the ``data`` config, the shared image preprocessing, a synthetic set.

Batches are a pure function of (seed, step, process): resuming at step k gives
exactly the batches an uninterrupted run would have seen, and each host reads
only its own shard of the records.

Image folders (``metadata.jsonl`` with ``file_name`` and ``text``, or ``name.txt``
beside each image) are prepared once by the TFDS builder in
``sd_jax/datasets/image_folder.py`` and read like any prepared TFDS dataset by
``sd_jax/training/tfds_source.py``. Unreadable images are skipped and counted, never fatal.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from PIL import Image

from sd_jax.tokenizer import tokenize


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


class SyntheticData:
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
        return {"images": np.stack(images).astype(np.float32), "input_ids": tokenize(self.tokenizer, captions),
                "original_size": np.full((batch_size, 2), s, np.int32),
                "crop_top_left": np.zeros((batch_size, 2), np.int32)}  # fmt: skip


def make_source(cfg, tokenizer, *, workdir=None, process_index=None, process_count=None):
    """The ``data`` config's source: ``synthetic``, ``folder`` (prepared once with the TFDS folder builder into
    ``data.data_dir`` or ``WORKDIR/tfds``) or ``tfds`` (a prepared dataset ``data.tfds_name`` in ``data.data_dir``).
    With ``data.cache`` set, batches hold cached VAE latents and text embeddings instead of pixels and ids."""
    if cfg.source == "synthetic":
        return SyntheticData(cfg, tokenizer)
    if cfg.source == "shapes":  # the embedded model's generated data set
        from sd_jax.training.shapes_data import ShapesData

        return ShapesData(cfg, tokenizer)
    if cfg.source not in ("folder", "tfds"):
        raise ValueError(f"data.source must be 'synthetic', 'folder', 'tfds' or 'shapes', got {cfg.source!r}")
    from sd_jax.training.tfds_source import TfdsSource

    builder = tfds_builder(cfg, workdir)
    source = TfdsSource(builder, cfg, tokenizer, process_index=process_index, process_count=process_count)
    if cfg.get("cache"):
        from sd_jax.training.cache import CachedSource

        return CachedSource(source, cfg.cache)
    return source


def tfds_builder(cfg, workdir=None):
    """The prepared TFDS builder named by the ``data`` config (preparing an image folder first if needed)."""
    import tensorflow_datasets as tfds

    data_dir = cfg.get("data_dir") or None
    if cfg.source == "folder":
        from sd_jax.datasets.image_folder import prepare_folder

        if not cfg.get("path"):
            raise ValueError("data.source='folder' needs data.path (a folder of images with captions)")
        if data_dir is None:
            if workdir is None:
                raise ValueError("data.source='folder' needs data.data_dir or a workdir to prepare the dataset into")
            data_dir = pathlib.Path(workdir) / "tfds"
        if jax.process_count() > 1:  # the main process prepares first; others reuse it on a shared disk
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                prepare_folder(cfg.path, data_dir)
            multihost_utils.sync_global_devices("sd_jax: image folder prepared")
        return prepare_folder(cfg.path, data_dir)
    if not cfg.get("tfds_name"):
        raise ValueError("data.source='tfds' needs data.tfds_name (a prepared TFDS dataset) and data.data_dir")
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
    except Exception as e:  # tfds raises several kinds for unknown names
        raise ValueError(f"data.tfds_name={cfg.tfds_name!r} (data_dir={data_dir}): {e}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {cfg.tfds_name!r} is not prepared in {builder.data_dir}; prepare it first "
            "(e.g. `tfds build` or builder.download_and_prepare(file_format='array_record')); runs never download"
        )
    return builder
