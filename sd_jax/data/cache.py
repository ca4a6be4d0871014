"""An on-disk cache of VAE posteriors and text embeddings: U-Net training then skips both frozen encoders.

    python -m sd_jax.training.cache --config configs/sd15_finetune.py --workdir runs/sd15 --out /data/cache \
        --config.init_from=/data/stable-diffusion-v1-5 --config.data.path=/data/images
    python train.py --config configs/sd15_finetune.py --workdir runs/sd15 --config.data.cache=/data/cache ...

What is stored, for every record of the dataset split (all hosts' shards: each host reads its own):

- ``mean.npy`` / ``logvar.npy`` ``[N, F, h, w, c]``: the VAE posterior of the center-cropped image, and with
  ``data.random_flip`` (F = 2) also of its mirror image. Training samples a fresh latent from the posterior every
  step with the same key as training from pixels, so cached and uncached runs compute the same loss.
- ``context.npy`` ``[N, 77, D]``: the frozen text encoder's last hidden state for the caption;
  ``null_context.npy`` ``[77, D]``: the same for the empty caption (caption dropout).
- ``valid.npy`` ``[N]``: False for an unreadable image (skipped and counted at train time, as from pixels).
- ``meta.json``, written last: the dataset, image size, flip, dtype and a fingerprint of the VAE and text
  encoder weights; training refuses a cache that does not match its config and weights.

:func:`build_cache` takes the encoders as functions (``sd_jax/cli/cache.py`` builds them from the run's models), so
the data package never imports the trainer. Random crops cannot be reproduced from latents, so ``data.random_crop``
is refused. Float32 by default (``--dtype float16`` halves the size: about 40 KB per image at 512px plus 118 KB
per caption).
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
from collections.abc import Callable

import jax
import numpy as np
from PIL import Image

import sd_jax.data.schema as schema
from sd_jax.data.source import Source
from sd_jax.data.tfds import TfdsSource, get_field
from sd_jax.data.transforms import preprocess
from sd_jax.tokenizer import tokenize

FILES = ("mean", "logvar", "context", "null_context", "valid")


def dataset_id(source: TfdsSource) -> dict:
    b = source.builder
    return {"name": b.name, "config": b.builder_config.name if b.builder_config else None,
            "version": str(b.version), "split": source.split, "records": len(source.records),
            "image_key": source.image_key, "text_key": source.text_key, "template": source.template}  # fmt: skip


def weights_fingerprint(params: dict) -> str:
    """SHA-1 over the VAE and text encoder weights (names, shapes and bytes) of a params dict by component."""
    h = hashlib.sha1()
    for name in ("vae", "text_encoder"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[name])[0]:
            a = np.asarray(leaf, np.float32)
            h.update(f"{name}{jax.tree_util.keystr(path)}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def check_cacheable(cfg, *, sdxl: bool = False) -> None:
    """Refuse a run the cache cannot feed: SDXL, random crops, or training anything but the U-Net."""
    if sdxl:
        raise ValueError("data.cache does not support SDXL (two text encoders, pooled embeddings, size/crop "
                         "micro-conditioning); train SDXL from pixels (leave data.cache empty)")  # fmt: skip
    if cfg.data.get("random_crop"):
        raise ValueError("data.random_crop cannot be cached (crops of latents differ); set it False to use data.cache")
    if tuple(cfg.train) != ("unet",):
        raise ValueError(f"data.cache holds frozen VAE and text encoder outputs; train=('unet',) only, got {cfg.train}")


def build_cache(source: TfdsSource, encode_images: Callable, encode_text: Callable, out, *, weights: str,
                batch_size: int = 16, dtype: str = "float32", log=print) -> pathlib.Path:  # fmt: skip
    """Encode every record of ``source`` (all of its split: build it with ``process_count=1``) into ``out``.

    ``encode_images(images [N, S, S, 3] in [-1, 1]) -> (mean, logvar)`` is the frozen VAE's posterior and
    ``encode_text(input_ids [N, T]) -> context [N, T, D]`` the frozen text encoder's last hidden state; ``weights``
    (:func:`weights_fingerprint` of their params) is stored so training refuses a cache from other weights.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until meta.json is written again
    cfg, tokenizer = source.cfg, source.tokenizer
    size, flip = cfg.image_size, bool(cfg.random_flip)
    views = 2 if flip else 1

    def encode(images, ids):
        stack = np.stack([images, images[:, :, ::-1]], 1) if flip else images[:, None]
        mean, logvar = encode_images(stack.reshape(-1, *stack.shape[2:]))
        unflat = lambda a: np.asarray(a, np.float32).reshape(stack.shape[0], views, *a.shape[1:])  # noqa: E731
        return unflat(mean), unflat(logvar), np.asarray(encode_text(ids), np.float32)

    n = len(source.records)
    null = np.asarray(encode_text(tokenize(tokenizer, [""])), np.float32)[0]
    dt = np.dtype(dtype)
    np.save(out / "null_context.npy", null.astype(dt))
    arrays = {}  # memory-mapped .npy files, created once the first batch shows the latent shape
    valid = np.zeros(n, bool)
    no_rng = np.random.default_rng(0)  # unused: center crop, no flip
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(n, lo + batch_size)))
        images, captions = np.zeros((batch_size, size, size, 3), np.float32), [""] * batch_size
        for k, i in enumerate(idx):
            try:
                record = source.records[i]
                with Image.open(io.BytesIO(get_field(record, source.image_key))) as im:
                    images[k] = preprocess(im, size, no_rng, random_crop=False, random_flip=False)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                log(f"cache: skipping unreadable record {i}: {e}")
                continue
            valid[i], captions[k] = True, source.caption(record)
        mean, logvar, context = encode(images, tokenize(tokenizer, captions))
        for name, a in (("mean", mean), ("logvar", logvar), ("context", context)):
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(out / f"{name}.npy", "w+", dt, (n, *a.shape[1:]))
            arrays[name][lo : lo + len(idx)] = np.asarray(a[: len(idx)], dt)
        log(f"cache: {lo + len(idx)}/{n} records")
    for a in arrays.values():
        a.flush()
    np.save(out / "valid.npy", valid)
    meta = {"dataset": dataset_id(source), "image_size": size, "flip": flip, "dtype": dt.name, "weights": weights,
            "skipped": int((~valid).sum())}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"cache: wrote {n} records ({meta['skipped']} unreadable) to {out}")
    return out


class CachedSource(Source):
    """Batches of ``{"latent_mean", "latent_logvar", "context"}`` from a cache, in the exact order (records,
    flips, caption dropout, skips) that ``source`` would give as pixels."""

    def __init__(self, source: TfdsSource, cache_dir):
        self.source, self.dir = source, pathlib.Path(cache_dir)
        meta_file = self.dir / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(
                f"{self.dir}: no finished latent cache (meta.json); build it with python -m sd_jax.training.cache"
            )
        self.meta = json.loads(meta_file.read_text())
        cfg = source.cfg
        want = {"dataset": dataset_id(source), "image_size": cfg.image_size, "flip": bool(cfg.random_flip)}
        have = {k: self.meta.get(k) for k in want}
        if have != want:
            raise ValueError(f"{self.dir}: the cache was built for {have}, but this run has {want}; rebuild it")
        if cfg.get("random_crop"):
            raise ValueError("data.random_crop cannot be used with data.cache (crops of latents differ)")
        self.arrays = {k: np.load(self.dir / f"{k}.npy", mmap_mode="r") for k in FILES}
        self.skipped = 0
        self.prepared_skipped = source.prepared_skipped  # unreadable when the folder was prepared

    def check_models(self, models, cfg) -> None:
        """Refuse a cache built with other VAE or text encoder weights, or a run that trains them. ``models`` has
        ``params`` (by component name) and ``sdxl``."""
        check_cacheable(cfg, sdxl=models.sdxl)
        if weights_fingerprint(models.params) != self.meta["weights"]:
            raise ValueError(
                f"{self.dir}: built with other VAE/text encoder weights than this run's; rebuild the cache"
            )

    def _load(self, idx: int, rng):
        a = self.arrays
        if not a["valid"][idx]:
            return None
        f = 1 if self.meta["flip"] and rng.random() < 0.5 else 0  # the draw preprocess makes for a flip
        context = a["context"][idx] if self.source.keep_caption(rng) else a["null_context"]
        return a["mean"][idx, f], a["logvar"][idx, f], context

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        examples, skipped = self.source.fill(step, batch_size, self._load)
        self.skipped += skipped
        stack = lambda k: np.stack([ex[k] for ex in examples]).astype(np.float32)  # noqa: E731
        return schema.latents(stack(0), stack(1), stack(2))
