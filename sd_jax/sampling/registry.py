"""Sampler registry: a name -> (sampler, its grid from a schedule, its initial noise scale), and the one entry point
pipelines call inside ``jit``.

Conventions of :func:`run_sampler`:

* the model is ``model(x_t, t, cond)`` returning the raw U-Net output (eps, v or x0 per
  ``schedule.prediction_type``), with ``x_t`` in the model's (VP) input space; guidance wraps it first
  (:func:`sd_jax.sampling.guidance.cfg_model`);
* ``noise`` is **unit-variance** Gaussian; the sampler scales it as the diffusers scheduler's
  ``init_noise_sigma`` would (in our VE space: ``sqrt(sigma_0^2 + 1)`` for VP schedulers and leading spacing,
  ``sigma_0`` for Euler-type schedulers with linspace/trailing spacing);
* the result is the final latent diffusers' loop returns, ready for the VAE decoder: VP, or for the Euler family
  (which may end at ``final_sigmas_type="sigma_min"``) the VE latent itself.

The grid is built host-side from ``(schedule, steps, options)`` (numpy, static), so one compile serves every key,
noise and prompt of a given (shape, steps). ``options`` come from the folder's scheduler config
(:mod:`sd_jax.sampling.scheduler_config`), whose ``SCHEDULE_TYPES`` are re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.sampling import grids
from sd_jax.sampling import samplers_multistep as ms
from sd_jax.sampling import samplers_onestep as os1
from sd_jax.sampling.denoiser import make_denoiser, process_x0
from sd_jax.sampling.scheduler_config import SCHEDULE_TYPES, SamplerOptions
from sd_jax.sampling.scheduler_keys import SAMPLER_CLASSES
from sd_jax.schedules import NoiseSchedule

__all__ = ["SAMPLERS", "SCHEDULE_TYPES", "Grid", "SamplerSpec", "get_sampler", "run_sampler", "sample", "sampler_grid"]


class Grid(NamedTuple):
    """What a sampler walks: ``sigmas[steps + 1]`` (VE noise levels, last the final one), ``ts[steps + 1]`` (the
    timestep diffusers feeds the U-Net at each), the sampler's keyword options (``extra``: ``sigmas_to`` for
    DDIM/PNDM, solver order, ...), the VE scale on unit start noise, whether the result is read as a VE latent
    (the Euler family; the others end in VP space) and the x0 clipping options."""

    sigmas: np.ndarray
    ts: np.ndarray
    extra: dict
    init_sigma: float = 1.0
    ve_output: bool = False
    options: SamplerOptions = SamplerOptions()


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    fn: Callable  # sample_x(denoise, x, sigmas, key=None, *, ts, noises, start, hook, record, **opts)
    diffusers_class: str
    stochastic: bool = False
    zero_snr: bool = True  # the diffusers scheduler implements rescale_betas_zero_snr
    order: int = 1  # model calls per step in diffusers' timesteps list (img2img slices timesteps[t_start*order:])


def _spec(name: str, fn: Callable, **kw) -> SamplerSpec:
    return SamplerSpec(fn, SAMPLER_CLASSES[name], **kw)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": _spec("ddim", os1.sample_ddim),  # stochastic when eta > 0
    "ddpm": _spec("ddpm", os1.sample_ddpm, stochastic=True),
    "pndm": _spec("pndm", ms.sample_pndm, zero_snr=False),
    "euler": _spec("euler", os1.sample_euler),
    "euler_a": _spec("euler_a", os1.sample_euler_ancestral, stochastic=True),
    "heun": _spec("heun", os1.sample_heun, order=2, zero_snr=False),
    "lms": _spec("lms", ms.sample_lms, zero_snr=False),
    "dpmpp_2m": _spec("dpmpp_2m", ms.sample_dpmpp_2m),
    "dpmpp_2m_karras": _spec("dpmpp_2m_karras", ms.sample_dpmpp_2m),  # dpmpp_2m with schedule "karras"
    "dpmpp_2m_sde": _spec("dpmpp_2m_sde", ms.sample_dpmpp_2m_sde, stochastic=True),
    "unipc": _spec("unipc", ms.sample_unipc),
    "lcm": _spec("lcm", os1.sample_lcm, stochastic=True),
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


def _sampler_kwargs(name: str, opts: SamplerOptions, steps: int) -> dict:
    """The step builder's keyword options from the scheduler config."""
    if name.startswith("dpmpp"):
        # diffusers' lower_order_final on the last step: euler_at_final, lower_order_final under 15 steps, or a
        # zero final sigma
        lower = opts.euler_at_final or (opts.lower_order_final and steps < 15) or opts.final_sigmas_type == "zero"
        return {"order": opts.solver_order, "lower_final": lower, "solver_type": opts.solver_type}
    if name == "unipc":
        return {"order": opts.solver_order, "lower_order_final": opts.lower_order_final,
                "solver_type": opts.solver_type, "disable_corrector": opts.disable_corrector}  # fmt: skip
    if name == "lcm":
        return {"timestep_scaling": opts.timestep_scaling}
    return {}


def sampler_grid(name: str, schedule: NoiseSchedule, steps: int, options: SamplerOptions | None = None) -> Grid:
    """The grid sampler ``name`` walks for ``steps`` steps, as its diffusers scheduler's ``set_timesteps`` with
    the scheduler config's ``options`` (:meth:`SchedulerConfig.resolve`; default: diffusers' SD defaults)."""
    spec = get_sampler(name)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    opts = SamplerOptions() if options is None else options
    if schedule.rescale_betas_zero_snr and not spec.zero_snr:
        raise UnsupportedArchitectureError(
            f"scheduler_config: rescale_betas_zero_snr=True, but diffusers' {spec.diffusers_class} does not support "
            f"it (it would silently ignore it); choose ddim, ddpm, euler, euler_a, dpmpp_2m*, unipc or lcm"
        )
    sigmas, ts = grids.sampler_grid(name, schedule, steps, opts)
    extra = _sampler_kwargs(name, opts, steps)
    if name in ("ddim", "pndm"):  # both step to t - T // steps, off the grid unless spacing is "leading"
        ratio = schedule.num_train_timesteps // steps
        t = ts[:-1].astype(np.int64)
        extra["sigmas_to"] = _sigma_at(schedule, t - ratio)
        if name == "pndm":  # the second half of the first step restarts from t_{i+1} + ratio
            extra["sigmas_restart"] = _sigma_at(schedule, ts[1:].astype(np.int64) + ratio)
    return Grid(
        sigmas.astype(np.float32),
        ts.astype(np.float32),
        extra,
        grids.init_noise_sigma(name, schedule, sigmas),
        name in grids.EULER_FAMILY,
        opts,
    )


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


def img2img(name: str, schedule: NoiseSchedule, steps: int, strength: float, x0, noise, options=None):
    """diffusers img2img's start: ``(grid, start, x_start)``; sample ``grid`` from step ``start`` on."""
    grid = sampler_grid(name, schedule, steps, options)
    start = img2img_start(steps, strength, get_sampler(name).order)
    return grid, start, noised_start(grid, min(start, steps - 1), x0, noise)


def blend_hook(grid: Grid, x0, noise, mask) -> Callable:
    """diffusers' 4-channel inpainting: after every scheduler step (and sub-step), keep the known region
    (``mask == 0``) on the forward process, ``x0`` noised by ``noise`` to the next grid sigma; after the last step
    the clean ``x0`` itself (read at the final sigma when the sampler ends in VP space)."""
    sig = jnp.asarray(grid.sigmas)
    last = sig.shape[0] - 2
    final = x0 if grid.ve_output else x0 * jnp.sqrt(sig[-1] ** 2 + 1)

    def hook(i, x, d):
        target = jnp.where(i == last, final, x0 + sig[i + 1] * noise)
        return (1 - mask) * target + mask * x

    return hook


def sample(name: str, denoise, noise, grid: Grid, key=None, *, hook=None, record: bool = False, start: int = 0,
           x_start=None, noises=None, after_step=None, **opts):  # fmt: skip
    """The one sampling entry (pipelines and :func:`run_sampler`): a prepared ``denoise`` and :func:`sampler_grid`.

    Runs ``name`` from unit ``noise`` (or ``x_start``, a VE latent at ``sigmas[start]``), with the x0 prediction
    clipped/thresholded as ``grid.options`` say; returns the final latent (VP, or VE for the Euler family, as
    diffusers' loop ends) and the per-step denoised estimates (or None). ``opts``: extra sampler options
    (``eta`` for DDIM). ``hook(i, x, d) -> x`` runs after every step and sub-step (inpainting's blend),
    ``after_step(i)`` after every whole step (progress).
    """
    spec = get_sampler(name)
    denoise = process_x0(denoise, grid.options)
    x = x_start if x_start is not None else noise * grid.init_sigma
    sigmas = jnp.asarray(grid.sigmas)
    out = spec.fn(denoise, x, sigmas, key, ts=jnp.asarray(grid.ts), noises=noises, start=start, hook=hook,
                  record=record, after_step=after_step, **grid.extra, **opts)  # fmt: skip
    x, ds = out if record else (out, None)
    if not grid.ve_output:
        x = x / jnp.sqrt(sigmas[-1] ** 2 + 1.0)
    return x, ds


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
    options: SamplerOptions | None = None,
    **opts,
):
    """Sample with ``name`` from unit ``noise`` through :func:`sample` (see the module docstring).

    ``key`` drives stochastic samplers (step i uses ``fold_in(key, i)``) unless ``noises`` ``[steps, *shape]``
    is given. With ``strength`` and the clean latent ``x0`` it is img2img: start at step
    :func:`img2img_start` from ``x0`` noised by ``noise`` there. ``options`` are the scheduler config's
    (:meth:`~sd_jax.sampling.scheduler_config.SchedulerConfig.resolve`), ``opts`` go to the sampler (``eta``).
    Returns ``(latent, denoised per step)`` when ``record``.
    """
    grid = sampler_grid(name, schedule, steps, options)
    denoise = make_denoiser(model, schedule, cond)
    noise = jnp.asarray(noise, jnp.float32)
    start, x_start = 0, None
    if strength is not None:
        if x0 is None:
            raise ValueError("img2img (strength given) needs the clean latent x0")
        start = img2img_start(steps, strength, get_sampler(name).order)
        if start >= steps:
            return (jnp.asarray(x0), None) if record else jnp.asarray(x0)
        x_start = noised_start(grid, start, jnp.asarray(x0, jnp.float32), noise)
    x, ds = sample(name, denoise, noise, grid, key, hook=hook, record=record, start=start, x_start=x_start,
                   noises=noises, **opts)  # fmt: skip
    return (x, ds) if record else x
