"""Samplers: short pure functions ``sample_x(denoise, x, sigmas, key) -> x``.

The step loop is a ``jax.lax.scan`` over ``(sigma, sigma_next)`` pairs, so a
whole trajectory is one jitted program; the noise at step i is
``jax.random.fold_in(key, i)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def sample_euler(denoise, x, sigmas, key=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with gamma=0).

    Matches diffusers ``EulerDiscreteScheduler``; on the DDIM sigma set it is
    DDIM with eta=0 (Song et al. 2021), as ``DDIMScheduler``.
    """
    del key

    def step(x, s):
        sigma, sigma_next = s
        d = to_d(x, sigma, denoise(x, sigma))
        return x + d * (sigma_next - sigma), None

    x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:]))
    return x


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``)."""
    up = jnp.minimum(sigma_next, eta * jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = jnp.sqrt(sigma_next**2 - up**2)
    return down, up


def sample_euler_ancestral(denoise, x, sigmas, key, eta=1.0):
    """Euler ancestral sampling, as diffusers ``EulerAncestralDiscreteScheduler``."""
    n = sigmas.shape[0] - 1

    def step(x, s):
        i, sigma, sigma_next = s
        denoised = denoise(x, sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (down - sigma)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x + noise * up, None

    x, _ = jax.lax.scan(step, x, (jnp.arange(n), sigmas[:-1], sigmas[1:]))
    return x
