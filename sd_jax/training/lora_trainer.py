"""Deprecated: LoRA training is the objective :class:`sd_jax.training.trainers.lora.Lora` (DreamBooth:
:mod:`sd_jax.training.trainers.dreambooth`) run by :mod:`sd_jax.training.loop`. These names stay importable."""

from __future__ import annotations

import pathlib

from sd_jax import deprecation
from sd_jax.training import loop

__all__ = ["LORA_FILE", "LoraTrainer", "export", "make_source", "train"]  # noqa: F822 (LORA_FILE: __getattr__)


def _deprecated(old: str, new: str) -> None:
    deprecation.warn(f"sd_jax.training.lora_trainer.{old}", new, stacklevel=4)


__getattr__ = deprecation.moved(__name__, {"LORA_FILE": "sd_jax.training.trainers.lora.LORA_FILE"})


class LoraTrainer(loop.Trainer):
    """Deprecated: ``loop.Trainer(cfg)`` of a ``trainer='lora'`` config."""

    def __init__(self, cfg, mesh=None):
        _deprecated("LoraTrainer", "sd_jax.training.loop.Trainer")
        super().__init__(cfg, mesh)

    def adapter(self, state, use_ema=True):
        return self.objective.adapter(state, use_ema)


def make_source(cfg, log=print):
    """Deprecated: DreamBooth's class images are sampled by its objective's ``prepare``; the data is
    ``sd_jax.data.make_source``."""
    _deprecated("make_source", "sd_jax.data.make_source")
    if cfg.data.source != "dreambooth":
        return None
    from sd_jax.data import make_source as data_source
    from sd_jax.training.model import build
    from sd_jax.training.trainers.dreambooth import sample_class_images

    sample_class_images(cfg, log)
    return data_source(cfg.data, build(cfg)[0].tokenizers[0])


def train(cfg, workdir, *, log=print, stop_at: int | None = None, mesh=None) -> dict:
    """Deprecated: :func:`sd_jax.training.loop.train` (the metrics carry ``lora_file``; here also ``state``)."""
    _deprecated("train", "sd_jax.training.loop.train / loop.run")
    r = loop.run(cfg, workdir, log=log, stop_at=stop_at, mesh=mesh)
    return {**r.metrics, "state": r.state}


def export(cfg, workdir, out, *, use_ema=True, mesh=None) -> pathlib.Path:
    """Deprecated: :func:`sd_jax.training.loop.export`."""
    _deprecated("export", "sd_jax.training.loop.export")
    return loop.export(cfg, workdir, out, use_ema=use_ema, mesh=mesh)
