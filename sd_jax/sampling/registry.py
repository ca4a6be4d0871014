"""Sampler registry: a name -> (sampler, its grid from a schedule, its initial noise scale), and the one entry point
pipelines call inside ``jit``.

Conventions of :func:`run_sampler`:

* the model is ``model(x_t, t, cond)`` returning the raw U-Net output (eps, v or x0 per
  ``schedule.prediction_type``), with ``x_t`` in the model's (VP) input space; guidance wraps it first
  (:func:`sd_jax.sampling.guidance.cfg_model`);
* ``noise`` is **unit-variance** Gaussian; the sampler scales it as the diffusers scheduler's
  ``init_noise_sigma`` would (in our VE space: ``sqrt(sigma_0^2 + 1)`` for VP schedulers and leading spacing,
  ``sigma_0`` for Euler-type schedulers with linspace/trailing spacing);
* the result is the final **VP latent**, what diffusers' loop returns, ready for the VAE decoder.

The grid is built host-side from ``(schedule, steps)`` (numpy, static), so one compile serves every key,
noise and prompt of a given (shape, steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.sampling import grids
from sd_jax.sampling import samplers_multistep as ms
from sd_jax.sampling import samplers_onestep as os1
from sd_jax.sampling.denoiser import make_denoiser
from sd_jax.schedules import NoiseSchedule


class Grid(NamedTuple):
    """What a sampler walks: ``sigmas[steps + 1]`` (VE noise levels, last the final one), ``ts[steps + 1]`` (the
    timestep diffusers feeds the U-Net at each) and sampler-specific extras (``sigmas_to`` for DDIM/PNDM)."""

    sigmas: np.ndarray
    ts: np.ndarray
    extra: dict


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    fn: Callable  # sample_x(denoise, x, sigmas, key=None, *, ts, noises, start, hook, record, **opts)
    diffusers_class: str
    stochastic: bool = False
    zero_snr: bool = True  # the diffusers scheduler implements rescale_betas_zero_snr
    order: int = 1  # model calls per step in diffusers' timesteps list (img2img slices timesteps[t_start*order:])


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(os1.sample_ddim, "DDIMScheduler"),  # stochastic when eta > 0
    "ddpm": SamplerSpec(os1.sample_ddpm, "DDPMScheduler", stochastic=True),
    "pndm": SamplerSpec(ms.sample_pndm, "PNDMScheduler", zero_snr=False),
    "euler": SamplerSpec(os1.sample_euler, "EulerDiscreteScheduler"),
    "euler_a": SamplerSpec(os1.sample_euler_ancestral, "EulerAncestralDiscreteScheduler", stochastic=True),
    "heun": SamplerSpec(os1.sample_heun, "HeunDiscreteScheduler", order=2, zero_snr=False),
    "lms": SamplerSpec(ms.sample_lms, "LMSDiscreteScheduler", zero_snr=False),
    "dpmpp_2m": SamplerSpec(ms.sample_dpmpp_2m, "DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SamplerSpec(ms.sample_dpmpp_2m, "DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": SamplerSpec(ms.sample_dpmpp_2m_sde, "DPMSolverMultistepScheduler", stochastic=True),
    "unipc": SamplerSpec(ms.sample_unipc, "UniPCMultistepScheduler"),
    "lcm": SamplerSpec(os1.sample_lcm, "LCMScheduler", stochastic=True),
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def _sigma_at(schedule: NoiseSchedule, t: np.ndarray) -> np.ndarray:
    """Sigma at integer timesteps; below 0 it is diffusers' ``final_alpha_cumprod`` (set_alpha_to_one)."""
    table = schedule.sigmas()
    final = 0.0 if schedule.set_alpha_to_one else float(table[0])
    t = np.asarray(t, np.int64)
    return np.where(t >= 0, table[np.clip(t, 0, len(table) - 1)], final).astype(np.float32)


def sampler_grid(name: str, schedule: NoiseSchedule, steps: int) -> Grid:
    """The grid sampler ``name`` walks for ``steps`` steps, as its diffusers scheduler's ``set_timesteps``."""
    spec = get_sampler(name)
    if schedule.rescale_betas_zero_snr and not spec.zero_snr:
        raise UnsupportedArchitectureError(
            f"scheduler_config: rescale_betas_zero_snr=True, but diffusers' {spec.diffusers_class} does not support "
            f"it (it would silently ignore it); choose ddim, ddpm, euler, euler_a, dpmpp_2m*, unipc or lcm"
        )
    sigmas, ts = grids.sampler_grid(name, schedule, steps)
    extra = {}
    if name in ("ddim", "pndm"):  # both step to t - T // steps, off the grid unless spacing is "leading"
        ratio = schedule.num_train_timesteps // steps
        t = ts[:-1].astype(np.int64)
        extra["sigmas_to"] = _sigma_at(schedule, t - ratio)
        if name == "pndm":  # the second half of the first step restarts from t_{i+1} + ratio
            extra["sigmas_restart"] = _sigma_at(schedule, ts[1:].astype(np.int64) + ratio)
    return Grid(sigmas.astype(np.float32), ts.astype(np.float32), extra)


def init_noise_sigma(name: str, schedule: NoiseSchedule, grid: Grid) -> float:
    """The VE scale on unit noise matching diffusers' ``init_noise_sigma`` (see the module docstring)."""
    return grids.init_noise_sigma(name, schedule, grid.sigmas)


def img2img_start(steps: int, strength: float, order: int = 1) -> int:
    """diffusers img2img: ``init_timestep = min(int(steps * strength), steps)``, ``t_start = steps - init_timestep``.

    Returns the first step index ``t_start`` (diffusers slices ``timesteps[t_start * order:]``, i.e. our grid
    from step ``t_start`` on). ``t_start == steps`` means nothing to do (strength 0).
    """
    del order  # our grid has one entry per step whatever the scheduler's order
    return max(steps - min(int(steps * strength), steps), 0)


def noised_start(grid: Grid, start: int, x0, noise):
    """The VE start latent at ``sigmas[start]``: diffusers' ``add_noise(x0, noise, timesteps[t_start])``.

    (VP ``sqrt(a) x0 + sqrt(1 - a) noise`` divided by ``sqrt(a)``; the same for Euler-type schedulers, whose
    ``add_noise`` is already ``x0 + sigma noise``.)
    """
    return x0 + jnp.asarray(grid.sigmas)[start] * noise


def img2img(name: str, schedule: NoiseSchedule, steps: int, strength: float, x0, noise):
    """diffusers img2img's start: ``(grid, start, x_start)``; sample ``grid`` from step ``start`` on."""
    grid = sampler_grid(name, schedule, steps)
    start = img2img_start(steps, strength, get_sampler(name).order)
    return grid, start, noised_start(grid, min(start, steps - 1), x0, noise)


def run_sampler(
    name: str,
    model,
    schedule: NoiseSchedule,
    noise,
    steps: int,
    key=None,
    *,
    cond=None,
    noises=None,
    strength: float | None = None,
    x0=None,
    hook=None,
    record: bool = False,
    **opts,
):
    """Sample with ``name`` from unit ``noise`` and return the final VP latent (see the module docstring).

    ``key`` drives stochastic samplers (step i uses ``fold_in(key, i)``) unless ``noises`` ``[steps, *shape]``
    is given. With ``strength`` and the clean latent ``x0`` it is img2img: start at step
    :func:`img2img_start` from ``x0`` noised by ``noise`` there. ``opts`` go to the sampler (``eta`` for DDIM).
    Returns ``(latent, denoised per step)`` when ``record``.
    """
    spec = get_sampler(name)
    grid = sampler_grid(name, schedule, steps)
    denoise = make_denoiser(model, schedule, cond)
    noise = jnp.asarray(noise, jnp.float32)
    if strength is None:
        start, x = 0, noise * init_noise_sigma(name, schedule, grid)
    else:
        if x0 is None:
            raise ValueError("img2img (strength given) needs the clean latent x0")
        start = img2img_start(steps, strength, spec.order)
        if start >= steps:
            return (jnp.asarray(x0), None) if record else jnp.asarray(x0)
        x = noised_start(grid, start, jnp.asarray(x0, jnp.float32), noise)
    out = spec.fn(denoise, x, grid.sigmas, key, ts=grid.ts, noises=noises, start=start, hook=hook, record=record,
                  **grid.extra, **opts)  # fmt: skip
    x, ds = out if record else (out, None)
    x = x / np.sqrt(float(grid.sigmas[-1]) ** 2 + 1.0)
    return (x, ds) if record else x


def sample(name, denoise, noise, sigmas, ts, key=None, *, init_sigma=None, hook=None, record=False, start=0,
           x_start=None, **opts):  # fmt: skip
    """Lower-level entry the pipelines use: a prepared ``denoise`` and grid (from ``grids.sampler_grid``).

    Runs ``name`` from unit ``noise`` (or ``x_start``, a VE latent at ``sigmas[start]``); returns the final VP
    latent and the per-step denoised estimates (or None). ``opts``: sampler options such as ``eta`` or the
    ``sigmas_to`` of :func:`sampler_grid` (without it DDIM/PNDM are exact for ``leading`` spacing only).
    """
    spec = get_sampler(name)
    key = jax.random.key(0) if key is None else key  # as before: stochastic samplers default to key 0 here
    scale = jnp.sqrt(sigmas[0] ** 2 + 1.0) if init_sigma is None else init_sigma
    x = x_start if x_start is not None else noise * scale
    out = spec.fn(denoise, x, sigmas, key, ts=ts, start=start, hook=hook, record=record, **opts)
    x, ds = out if record else (out, None)
    return x / jnp.sqrt(sigmas[-1] ** 2 + 1.0), ds
