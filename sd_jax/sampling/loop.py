"""The one step loop every sampler runs in: a ``lax.scan`` over step indices, plus shared step math.

A sampler is written as a *step builder* ``build(denoise, sigmas, ts, noise, x, **opts) -> (step, state)``:

* ``denoise(x, sigma, t)`` is the VE-space denoiser (:mod:`sd_jax.sampling.denoiser`);
* ``sigmas`` holds ``steps + 1`` noise levels, ``ts`` the model timestep diffusers feeds the U-Net at each
  (``None``: the denoiser derives it from sigma);
* ``noise(i, x)`` is the unit Gaussian for step ``i`` (injected or ``fold_in(key, i)``);
* ``step(i, x, state) -> (x, state, denoised)`` advances from ``sigmas[i]`` to ``sigmas[i + 1]``; multistep
  history lives in ``state`` as fixed-size arrays, so the loop is one ``lax.scan`` with no Python loop over steps.

:func:`sampler` turns a builder into the public k-diffusion-style function
``sample_x(denoise, x, sigmas, key=None, *, ts=None, noises=None, start=0, hook=None, record=False, after_step=None,
halt=None, **opts)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``)."""
    up = jnp.minimum(sigma_next, eta * jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = jnp.sqrt(sigma_next**2 - up**2)
    return down, up


def alpha_bar(sigma):
    """VP ``alpha_bar`` of a VE noise level: ``x_VP = sqrt(alpha_bar) x_VE``, ``sigma^2 = (1 - a) / a``."""
    return 1.0 / (1.0 + sigma**2)


def reread(x, sigma_from, sigma_to):
    """The same VP latent, read at another noise level.

    diffusers' DDIM/PNDM step to ``t - T // steps``, which off ``leading`` spacing is not the next grid
    timestep; the VP latent is then used as is there. Exactly ``x`` when the two sigmas are equal.
    """
    return x * jnp.sqrt((1.0 + sigma_to**2) / (1.0 + sigma_from**2))


def at(ts, i):
    """The model timestep of grid point ``i``, or ``None`` when the denoiser derives it from sigma."""
    return None if ts is None else ts[i]


def step_noise(key, noises) -> Callable:
    """``noise(i, x)``: ``noises[i]`` when injected (tests feed diffusers the same), else ``fold_in(key, i)``.

    ``key`` may be one key per row (shape ``[N]``, A1111's per-image RNG): row ``n`` then draws
    ``normal(fold_in(key[n], i), x.shape[1:])``, whatever else shares the batch (the server's batching relies on
    it); a single key draws the whole batch at once. One row's draw is the same either way."""

    def noise(i, x):
        if noises is not None:
            return jnp.asarray(noises, x.dtype)[i]
        if key is None:
            raise ValueError("a stochastic sampler needs a PRNG `key` or injected `noises` [steps, *x.shape]")
        if jnp.ndim(key) == 1:
            return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(key)
        return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)

    return noise


def integrate(step, state, x, n_steps: int, *, start=0, hook=None, record: bool = False, after_step=None,
              halt=None):  # fmt: skip
    """Run ``step`` for ``i = start .. n_steps - 1`` in one ``lax.scan``; (x, per-step denoised or None).

    ``hook(i, x, denoised) -> x`` runs after each step (latent-blend inpainting); ``after_step(i)`` after each
    whole step, for its side effect (progress). ``halt(i) -> bool`` (traced), asked before each step: once true,
    the remaining steps are skipped (``lax.cond``: no model call) and ``x`` stays as it is (an interrupt).
    """

    def advance(i, x, state):
        x, state, d = step(i, x, state)
        if hook is not None:
            x = hook(i, x, d)
        if after_step is not None:
            after_step(i)
        return x, state, (d if record else None)

    def body(carry, i):
        x, state, halted = carry
        if halt is None:
            x, state, d = advance(i, x, state)
        else:
            halted = jnp.logical_or(halted, halt(i))
            # the skipped branch needs d's shape only when it is recorded (else a second trace of the model)
            d_shape = jax.eval_shape(advance, i, x, state)[2] if record else None

            def skip(i, x, state):
                return x, state, None if d_shape is None else jnp.zeros(d_shape.shape, d_shape.dtype)

            x, state, d = jax.lax.cond(halted, skip, advance, i, x, state)
        return (x, state, halted), d

    (x, _, _), ds = jax.lax.scan(body, (x, state, jnp.bool_(False)), jnp.arange(start, n_steps))
    return x, ds


def sampler(build: Callable) -> Callable:
    """The public ``sample_x(denoise, x, sigmas, key=None, **opts) -> x`` of a step builder.

    ``x`` is the VE latent at ``sigmas[start]``; the result is the VE latent at ``sigmas[-1]`` (and the per-step
    denoised estimates ``[steps - start, *x.shape]`` when ``record``). ``noises`` is ``[steps, *x.shape]``,
    indexed by absolute step.
    """

    @functools.wraps(build)
    def run(denoise, x, sigmas, key=None, *, ts=None, noises=None, start=0, end=None, hook=None, record=False,
            after_step=None, halt=None, **opts):  # fmt: skip
        sigmas = jnp.asarray(sigmas, jnp.float32)
        if ts is None:  # a plain k-diffusion ``denoise(x, sigma)`` works too
            plain = denoise

            def denoise(x, sigma, t=None):
                return plain(x, sigma)

            denoise.prediction_type = getattr(plain, "prediction_type", "epsilon")
        else:
            ts = jnp.asarray(ts, jnp.float32)
        if getattr(build, "substep_hook", False):  # samplers with sub-steps hand the hook each of them
            opts = dict(opts, hook=hook)
        step, state = build(denoise, sigmas, ts, step_noise(key, noises), x, **opts)
        n = sigmas.shape[0] - 1 if end is None else end  # ``end``: stop at sigmas[end] (denoising_end)
        x, ds = integrate(step, state, x, n, start=start, hook=hook, record=record, after_step=after_step,
                          halt=halt)  # fmt: skip
        return (x, ds) if record else x

    run.build = build
    return run
