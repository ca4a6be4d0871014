"""Training batches from any prepared TFDS dataset with an image feature and a text or label feature.

The dataset is read through ``builder.as_data_source()`` (array_record, random access, no TensorFlow) and
ordered with grain: this host's shard of the record indices (``process_index::process_count``), shuffled
afresh every epoch. Example ``j`` of the per-host batch at ``step`` is position ``step * batch + j`` of that
order, and its augmentation draws from ``rng(seed, step, process, j)``: a batch is a pure function of
(seed, step, process), so a resumed run sees exactly the batches of an uninterrupted one.

A record whose image cannot be decoded is skipped and counted (``skipped``); the slot is refilled by a record
drawn from the same deterministic generator, so skipping keeps batches reproducible.

Captions come from a ``Text`` feature (bytes, decoded as UTF-8) or a ``ClassLabel`` feature, rendered as
``caption_template.format(name=...)`` with the class name's underscores as spaces.

:func:`tfds_builder` opens the dataset a ``data`` config names: ``data.source='folder'`` prepares the image folder
first (:mod:`sd_jax.data.folder`), ``'tfds'`` opens a prepared dataset (runs never download).
"""

from __future__ import annotations

import concurrent.futures
import copy
import io
import os
import pathlib

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

import sd_jax.data.control as control
import sd_jax.data.schema as schema
from sd_jax.data.folder import prepare_folder, prepared_skipped
from sd_jax.data.source import Source
from sd_jax.data.transforms import preprocess
from sd_jax.tokenizer import tokenize

MAX_ATTEMPTS = 64  # consecutive unreadable records for one slot before giving up


def _feature_at(features, key: str):
    node = features
    for part in key.split("/"):
        node = node[part]
    return node


def find_keys(features, image_key: str | None, text_key: str | None) -> tuple[str, str]:
    """The image and caption feature names: given ones are checked, missing ones are the first of their kind."""
    flat = dict(features.items())

    def first(kinds):
        return next((k for k, f in flat.items() if isinstance(f, kinds)), None)

    image_key = image_key or first(tfds.features.Image)
    text_key = text_key or first(tfds.features.Text) or first(tfds.features.ClassLabel)
    if image_key is None or text_key is None:
        raise ValueError(
            f"dataset features {sorted(flat)} need an Image and a Text or ClassLabel feature; "
            "name them with data.image_key / data.text_key"
        )
    for key, kinds in ((image_key, tfds.features.Image), (text_key, (tfds.features.Text, tfds.features.ClassLabel))):
        try:
            f = _feature_at(features, key)
        except KeyError:
            raise ValueError(f"dataset has no feature {key!r}; it has {sorted(flat)}") from None
        if not isinstance(f, kinds):
            raise ValueError(f"feature {key!r} is a {type(f).__name__}, expected {kinds}")
    return image_key, text_key


def _nested(key: str, value):
    for part in reversed(key.split("/")):
        value = {part: value}
    return value


def get_field(record, key: str):
    for part in key.split("/"):
        record = record[part]
    return record


class TfdsSource(Source):
    """Deterministic batches of ``{"images": float32 [B, S, S, 3] in [-1, 1], "input_ids": int32 [B, 77]}``.

    ``cfg`` is the ``data`` config (image_size, random_crop, random_flip, caption_dropout, seed, and optionally
    split, image_key, text_key, caption_template, workers).
    """

    def __init__(self, builder, cfg, tokenizer, *, process_index: int | None = None, process_count: int | None = None):
        self.cfg, self.tokenizer, self.builder = cfg, tokenizer, builder
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.split = cfg.get("split") or "train"
        features = builder.info.features
        self.image_key, self.text_key = find_keys(features, cfg.get("image_key"), cfg.get("text_key"))
        text_feature = _feature_at(features, self.text_key)
        self.label_names = text_feature.names if isinstance(text_feature, tfds.features.ClassLabel) else None
        self.template = cfg.get("caption_template") or "a photo of a {name}"
        if self.split not in builder.info.splits:
            raise ValueError(f"{builder.name}: no split {self.split!r}; it has {sorted(builder.info.splits)}")
        # Images stay encoded: PIL decodes them here, so a corrupt one is caught per record.
        decoders = _nested(self.image_key, tfds.decode.SkipDecoding())
        self.records = grain.MapDataset.source(builder.as_data_source(split=self.split, decoders=decoders))
        n = len(self.records)
        self.order = grain.MapDataset.range(n)[self.process_index :: self.process_count].shuffle(seed=int(cfg.seed))
        if len(self.order) == 0:
            raise ValueError(
                f"{builder.name}[{self.split}] has {n} records: none for process {self.process_index} "
                f"of {self.process_count}"
            )
        self.skipped = 0  # records unreadable at read time, by this process
        self.prepared_skipped = prepared_skipped(builder)  # images left out when an image folder was prepared
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, int(cfg.get("workers") or min(8, os.cpu_count()))))

    def __len__(self) -> int:
        """Records in this host's shard."""
        return len(self.order)

    # -- shared with the latent cache: which record fills a slot, and with which generator --

    def slot_attempts(self, step: int, batch_size: int, j: int):
        """(record index, rng) candidates for slot ``j`` of the per-host batch at ``step``, in order."""
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.cfg.seed, step, self.process_index, j, attempt])
            pos = step * batch_size + j if attempt == 0 else int(rng.integers(len(self.order)))
            yield int(self.order[pos]), rng

    def fill(self, step: int, batch_size: int, load) -> tuple[list, int]:
        """``load(record index, rng) -> example or None`` for every slot (threads); returns (examples, skipped)."""

        def slot(j):
            for skipped, (idx, rng) in enumerate(self.slot_attempts(step, batch_size, j)):
                ex = load(idx, rng)
                if ex is not None:
                    return ex, skipped
            raise RuntimeError(
                f"{self.builder.name}: {MAX_ATTEMPTS} unreadable records in a row at step {step}; is the data corrupt?"
            )

        out = list(self._pool.map(slot, range(batch_size)))
        return [ex for ex, _ in out], sum(s for _, s in out)

    def caption(self, record) -> str:
        value = get_field(record, self.text_key)
        if self.label_names is not None:
            return self.template.format(name=self.label_names[int(value)].replace("_", " "))
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def keep_caption(self, rng) -> bool:
        return rng.random() >= self.cfg.caption_dropout

    # -- images --

    def _load(self, idx: int, rng):
        cfg = self.cfg
        kind = control.check(cfg)
        try:
            record = self.records[idx]
            same = copy.deepcopy(rng)  # the conditioning image takes the image's crop and flip
            with Image.open(io.BytesIO(get_field(record, self.image_key))) as im:
                arr, size, crop = preprocess(im, cfg.image_size, rng, random_crop=cfg.random_crop,
                                             random_flip=cfg.random_flip, with_crop=True)  # fmt: skip
            hint = None
            if kind == "column":
                with Image.open(io.BytesIO(get_field(record, cfg.control_key))) as im:
                    hint = control.to_unit(preprocess(im, cfg.image_size, same, random_crop=cfg.random_crop,
                                                      random_flip=cfg.random_flip))  # fmt: skip
            elif kind == "canny":
                hint = control.canny_of(arr)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        return arr, (self.caption(record) if self.keep_caption(rng) else ""), size, crop, hint

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        """This host's ``batch_size`` examples at ``step`` (``offset`` is unused: each host has its own shard)."""
        examples, skipped = self.fill(step, batch_size, self._load)
        self.skipped += skipped
        hints = [e[4] for e in examples]
        return schema.pixels(np.stack([e[0] for e in examples]), tokenize(self.tokenizer, [e[1] for e in examples]),
                             original_size=[e[2] for e in examples],  # SDXL micro-conditioning
                             crop_top_left=[e[3] for e in examples],
                             control=None if hints[0] is None else np.stack(hints))  # fmt: skip


def tfds_builder(cfg, workdir=None):
    """The prepared TFDS builder named by the ``data`` config (preparing an image folder first if needed)."""
    data_dir = cfg.get("data_dir") or None
    if cfg.source == "folder":
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
