"""Deprecated: the training loop is :mod:`sd_jax.training.loop` and the objectives are
:mod:`sd_jax.training.trainers`; the models are :func:`sd_jax.training.model.build` (a
:class:`~sd_jax.components.Components` value and its params). These names stay importable for a while."""

from __future__ import annotations

import pathlib

from sd_jax import deprecation
from sd_jax.training import loop
from sd_jax.training import model as model_lib
from sd_jax.training.model import ModelView

__all__ = ["Models", "Trainer", "build_models", "export", "latent_scaling_factor", "loss_fn", "tokenizer_for",  # noqa: F822
           "train"]  # fmt: skip


def _deprecated(old: str, new: str) -> None:
    deprecation.warn(f"sd_jax.training.trainer.{old}", new, stacklevel=4)


__getattr__ = deprecation.moved(__name__, {"Models": "sd_jax.training.model.ModelView"})


def build_models(cfg) -> ModelView:
    """Deprecated: ``sd_jax.training.model.build(cfg)`` gives ``(components, params)``."""
    _deprecated("build_models", "sd_jax.training.model.build")
    comps, params = model_lib.build(cfg)
    return ModelView(comps, params, tuple(cfg.train))


def loss_fn(models: ModelView, cfg, trainable, frozen, batch, key):
    """Deprecated: the objective's loss (``trainers.diffusion.diffusion_loss`` / ``trainers.vae.vae_loss``)."""
    from sd_jax.training.trainers.diffusion import diffusion_loss
    from sd_jax.training.trainers.vae import vae_loss

    _deprecated("loss_fn", "the objective's loss (sd_jax.training.trainers)")
    p = {**frozen, **trainable}
    if tuple(models.trainable) == ("vae",):
        return vae_loss(models.components, cfg, p, batch, key)
    return diffusion_loss(models.components, cfg, p, batch, key, models.trainable)


class Trainer(loop.Trainer):
    """Deprecated: :class:`sd_jax.training.loop.Trainer`."""

    def __init__(self, cfg, mesh=None):
        _deprecated("Trainer", "sd_jax.training.loop.Trainer")
        super().__init__(cfg, mesh)


def train(cfg, workdir, *, log=None, stop_at: int | None = None, trainer=None, source=None) -> dict:
    """Deprecated: :func:`sd_jax.training.loop.train` (metrics) or :func:`~sd_jax.training.loop.run` (state too).
    As before, the metrics carry the final state under ``"state"``."""
    _deprecated("train", "sd_jax.training.loop.train / loop.run")
    r = loop.run(cfg, workdir, log=log, stop_at=stop_at, trainer=trainer, source=source)
    return {**r.metrics, "state": r.state}


def export(cfg, workdir, out, *, use_ema=True):
    """Deprecated: :func:`sd_jax.training.loop.export`."""
    _deprecated("export", "sd_jax.training.loop.export")
    return loop.export(cfg, workdir, out, use_ema=use_ema)


def latent_scaling_factor(vae, params, source, *, batches: int = 8, batch_size: int = 64) -> float:
    """Deprecated: :func:`sd_jax.training.trainers.vae.latent_scaling_factor` of ``(components, vae params)``."""
    import jax
    import numpy as np

    from sd_jax.models import vae as vae_lib

    _deprecated("latent_scaling_factor", "sd_jax.training.trainers.vae.latent_scaling_factor")
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode)[0])
    z = np.concatenate([np.asarray(encode(params, source.batch(i, batch_size)["images"])) for i in range(batches)])
    return float(1.0 / (z.std() + 1e-8))


def tokenizer_for(cfg):
    """Deprecated: the run's tokenizers are ``components.tokenizers`` (``loop.Trainer(cfg).tokenizers``)."""
    from sd_jax.tokenizer import load_tokenizer

    _deprecated("tokenizer_for", "components.tokenizers")
    return load_tokenizer(pathlib.Path(cfg.init_from) / "tokenizer" if cfg.get("init_from") else None)
