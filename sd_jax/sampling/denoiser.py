"""The U-Net wrapped once as a denoiser ``D(x, sigma, t) -> x0``.

Samplers work in k-diffusion's variance-exploding space ``x = x_t / sqrt(alpha_bar)``
with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (Karras et al. 2022, Table 1).
Epsilon-, v- and sample-prediction checkpoints are adapted here, by the scalings of
:mod:`sd_jax.parametrization`.
``t`` is the timestep fed to the U-Net (diffusers' choice per scheduler); when
omitted it is found from ``sigma`` by log-sigma interpolation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from sd_jax.parametrization import scalings
from sd_jax.schedules import NoiseSchedule

# model(x_t, t, cond) -> raw U-Net output, with x_t in the model's (VP) input space.
Model = Callable[[jnp.ndarray, jnp.ndarray, object], jnp.ndarray]
Denoiser = Callable[..., jnp.ndarray]


def sigma_to_t(sigma: jnp.ndarray, log_sigmas: jnp.ndarray) -> jnp.ndarray:
    """Fractional trained timestep of ``sigma`` by log-sigma interpolation (k-diffusion ``DiscreteSchedule``)."""
    log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
    low = jnp.clip(jnp.sum(log_sigmas <= log_sigma) - 1, 0, log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1 - w) * low + w * (low + 1)


def make_denoiser(model: Model, schedule: NoiseSchedule, cond) -> Denoiser:
    """``D(x, sigma, t=None)``: the model's estimate of the clean latent, for a VE-space ``x``."""
    log_sigmas = jnp.asarray(np.log(schedule.sigmas()))
    kind = schedule.prediction_type

    def denoise(x, sigma, t=None):
        c_skip, c_out, c_in = scalings(kind, sigma)
        t = sigma_to_t(sigma, log_sigmas) if t is None else t
        out = model((x * c_in).astype(x.dtype), t, cond).astype(jnp.float32)
        return c_skip * x + c_out * out

    denoise.prediction_type = kind  # multistep samplers that combine raw outputs (PNDM) need it
    return denoise


def dynamic_threshold(x0, ratio: float = 0.995, max_value: float = 1.0):
    """Saharia et al. 2022 (Imagen), dynamic thresholding, as diffusers' ``_threshold_sample``: per sample, the
    ``ratio`` quantile ``s`` of ``|x0|`` clamped to ``[1, max_value]``; ``x0`` clipped to ``[-s, s]`` then / s."""
    flat = x0.reshape(x0.shape[0], -1).astype(jnp.float32)
    s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def process_x0(denoise: Denoiser, opts) -> Denoiser:
    """The x0 prediction clipped (``clip_sample``/``clip_sample_range``) or dynamically thresholded
    (``thresholding``, which wins, as in diffusers), once for every sampler.

    The result keeps the raw denoiser as ``.unclipped`` and the clip as ``.clip_x0``: diffusers' DDIM clips x0 but
    keeps the model's own epsilon (``use_clipped_model_output=False``).
    """
    if opts.thresholding:

        def clip(x0):
            return dynamic_threshold(x0, opts.dynamic_thresholding_ratio, opts.sample_max_value)

    elif opts.clip_sample:
        r = opts.clip_sample_range

        def clip(x0):
            return jnp.clip(x0, -r, r)

    else:
        return denoise

    def clipped(x, sigma, t=None):
        return clip(denoise(x, sigma, t))

    clipped.prediction_type = getattr(denoise, "prediction_type", "epsilon")
    clipped.unclipped, clipped.clip_x0 = denoise, clip
    return clipped
