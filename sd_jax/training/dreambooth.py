"""DreamBooth's class images (Ruiz et al. 2023), for prior preservation: samples of ``data.class_prompt``
("a photo of a dog") from the frozen model itself. The batches are :class:`sd_jax.data.dreambooth.DreamBoothSource`
(importable here as ``DreamBoothData`` until the trainers import it from there).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from PIL import Image

from sd_jax.data.dreambooth import DreamBoothSource as DreamBoothData
from sd_jax.data.folder import scan_folder

__all__ = ["DreamBoothData", "prepare_class_images"]


def prepare_class_images(cfg, log=print) -> int:
    """Fill ``data.class_path`` up to ``data.num_class_images`` with samples of ``data.class_prompt`` from the
    frozen ``init_from`` model (diffusers' ``train_dreambooth`` does the same); returns how many were made."""
    from jax.experimental import multihost_utils

    d = cfg.data
    folder = pathlib.Path(d.class_path or "")
    if not d.class_path:
        raise ValueError("DreamBooth prior preservation needs data.class_path (a folder; it is created if absent)")
    folder.mkdir(parents=True, exist_ok=True)
    have = len(scan_folder(folder))
    need = max(d.num_class_images - have, 0)
    if need and jax.process_index() == 0:
        from sd_jax.pipelines.pipeline import StableDiffusion

        if not cfg.get("init_from"):
            raise ValueError("DreamBooth class images are sampled from config.init_from; set it")
        log(f"DreamBooth: sampling {need} class image(s) of {d.class_prompt!r} into {folder}")
        pipe = StableDiffusion.load(cfg.init_from, safety_checker=False)
        for start in range(0, need, d.class_batch_size):
            n = min(d.class_batch_size, need - start)
            images, _ = pipe.txt2img([d.class_prompt] * n, height=d.image_size, width=d.image_size,
                                     steps=d.class_sample_steps, seed=cfg.seed + have + start)  # fmt: skip
            for j, img in enumerate(np.asarray(images)):
                Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / f"class_{have + start + j:05d}.png")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dreambooth_class_images")
    return need
