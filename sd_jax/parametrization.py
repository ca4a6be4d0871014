"""What a diffusion model's output means: epsilon-, v- or sample-prediction (diffusers' ``prediction_type``).

Written once here and shared by the sampling denoiser (:func:`sd_jax.sampling.denoiser.make_denoiser`), the
training target (:func:`sd_jax.training.objectives.diffusion_loss`) and PNDM, which combines raw outputs.

The forward process is ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (VP) and ``v = sqrt(abar) eps -
sqrt(1 - abar) x0`` (Salimans & Ho 2022). Samplers work in k-diffusion's VE space ``x = x_t / sqrt(abar)``,
``sigma = sqrt((1 - abar) / abar)``, where the denoiser is ``D(x) = c_skip x + c_out F(c_in x)`` with the
scalings of Karras et al. 2022 (Table 1; k-diffusion ``get_scalings``, ``sigma_data = 1``).
"""

from __future__ import annotations

import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {kind!r}; choose from {', '.join(PREDICTION_TYPES)}")


def scalings(kind: str, sigma):
    """``(c_skip, c_out, c_in)`` of the VE denoiser ``D(x) = c_skip x + c_out F(c_in x)`` at noise level ``sigma``."""
    _check(kind)
    c_in = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    if kind == "epsilon":  # x0 = x - sigma eps
        return 1.0, -sigma, c_in
    if kind == "v_prediction":  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return c_in**2, -sigma * c_in, c_in
    return 0.0, 1.0, c_in  # "sample"


def denoised(kind: str, out, x, sigma):
    """The clean-latent estimate from the raw model output ``out`` at the VE latent ``x``."""
    c_skip, c_out, _ = scalings(kind, sigma)
    return c_skip * x + c_out * out


def output_from_denoised(kind: str, d, x, sigma):
    """The raw model output that gives the estimate ``d`` at the VE latent ``x`` (the inverse of :func:`denoised`)."""
    c_skip, c_out, _ = scalings(kind, sigma)
    return (d - c_skip * x) / c_out


def eps_from_output(kind: str, out, x, sigma):
    """The epsilon a raw model output stands for at the VE latent ``x`` (diffusers' PNDM turns v into it)."""
    _check(kind)
    if kind == "epsilon":
        return out
    c_in = 1.0 / jnp.sqrt(sigma**2 + 1.0)  # sqrt(abar)
    if kind == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t, with x_t = sqrt(abar) x
        return c_in * out + sigma * c_in * (c_in * x)
    return (x - out) / sigma  # "sample": x = x0 + sigma eps


def training_target(kind: str, x0, noise, abar):
    """What the model learns to output for ``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise``."""
    _check(kind)
    if kind == "v_prediction":
        return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0
    if kind == "epsilon":
        return noise
    return x0
