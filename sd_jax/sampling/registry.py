"""Sampler registry: each name's row owns its step function, its grid and its initial noise scale; the one
sampling entry :func:`sample` and the one img2img start :func:`start_from`, which pipelines and tests call.

Conventions:

* ``denoise`` is :func:`sd_jax.sampling.denoiser.make_denoiser` of the (guided) model: ``D(x, sigma, t) -> x0``
  on the VE latent;
* ``noise`` is **unit-variance** Gaussian; :func:`sample` scales it as the diffusers scheduler's
  ``init_noise_sigma`` would (in our VE space: ``sqrt(sigma_0^2 + 1)`` for VP schedulers and leading spacing,
  ``sigma_0`` for Euler-type schedulers with linspace/trailing spacing);
* the result is the final latent diffusers' loop returns, ready for the VAE decoder: VP, or for the Euler family
  (which may end at ``final_sigmas_type="sigma_min"``) the VE latent itself.

The grid is built host-side from ``(schedule, steps, options)`` (numpy, static), so one compile serves every key,
noise and prompt of a given (shape, steps). ``options`` come from the folder's scheduler config
(:meth:`~sd_jax.sampling.scheduler_config.SchedulerConfig.resolve`); the schedule type is one of them, so
``dpmpp_2m_karras`` is the ``dpmpp_2m`` row with schedule ``karras`` (``SCHEDULE_ALIASES``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.sampling import grids
from sd_jax.sampling import samplers_multistep as ms
from sd_jax.sampling import samplers_onestep as os1
from sd_jax.sampling.denoiser import process_x0
from sd_jax.sampling.scheduler_config import SCHEDULE_TYPES, SamplerOptions
from sd_jax.sampling.scheduler_keys import SAMPLER_CLASSES, SCHEDULE_ALIASES
from sd_jax.schedules import NoiseSchedule

__all__ = ["SAMPLERS", "SCHEDULE_TYPES", "Grid", "SamplerSpec", "get_sampler", "sample", "sampler_grid",
           "start_from"]  # fmt: skip


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


def _sigma_at(schedule: NoiseSchedule, t: np.ndarray) -> np.ndarray:
    """Sigma at integer timesteps; below 0 it is diffusers' ``final_alpha_cumprod`` (set_alpha_to_one)."""
    table = schedule.sigmas()
    final = 0.0 if schedule.set_alpha_to_one else float(table[0])
    t = np.asarray(t, np.int64)
    return np.where(t >= 0, table[np.clip(t, 0, len(table) - 1)], final).astype(np.float32)


# -- each sampler's keyword options: (schedule, steps, opts, ts) -> dict --


def _no_kwargs(schedule, steps, opts, ts) -> dict:
    return {}


def _dpm_kwargs(schedule, steps, opts, ts) -> dict:
    # diffusers' lower_order_final on the last step: euler_at_final, lower_order_final under 15 steps, or a zero
    # final sigma
    lower = opts.euler_at_final or (opts.lower_order_final and steps < 15) or opts.final_sigmas_type == "zero"
    return {"order": opts.solver_order, "lower_final": lower, "solver_type": opts.solver_type}


def _unipc_kwargs(schedule, steps, opts, ts) -> dict:
    return {"order": opts.solver_order, "lower_order_final": opts.lower_order_final,
            "solver_type": opts.solver_type, "disable_corrector": opts.disable_corrector}  # fmt: skip


def _lcm_kwargs(schedule, steps, opts, ts) -> dict:
    return {"timestep_scaling": opts.timestep_scaling}


def _ddim_kwargs(schedule, steps, opts, ts) -> dict:
    """DDIM steps to ``t - T // steps``, off the grid unless spacing is "leading"."""
    ratio = schedule.num_train_timesteps // steps
    return {"sigmas_to": _sigma_at(schedule, ts[:-1].astype(np.int64) - ratio)}


def _pndm_kwargs(schedule, steps, opts, ts) -> dict:
    """As DDIM; and the second half of PNDM's first step restarts from ``t_{i+1} + T // steps``."""
    ratio = schedule.num_train_timesteps // steps
    return {**_ddim_kwargs(schedule, steps, opts, ts),
            "sigmas_restart": _sigma_at(schedule, ts[1:].astype(np.int64) + ratio)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its step function, the grid its diffusers scheduler's ``set_timesteps`` builds, the VE scale
    diffusers' ``init_noise_sigma`` puts on unit noise, and its keyword options from the scheduler config."""

    fn: Callable  # sample_x(denoise, x, sigmas, key=None, *, ts, noises, start, hook, record, **opts)
    diffusers_class: str
    grid_fn: Callable  # (schedule, steps, opts) -> (sigmas[steps + 1], ts[steps + 1])
    init_sigma: Callable = grids.vp_init_sigma  # (schedule, sigmas) -> float
    ve_output: bool = False  # the result is the VE latent (Euler-type schedulers), else VP
    kwargs: Callable = _no_kwargs
    zero_snr: bool = True  # the diffusers scheduler implements rescale_betas_zero_snr
    schedule_type: str = "default"  # an alias's fixed schedule type (SCHEDULE_ALIASES)

    def grid(self, schedule: NoiseSchedule, steps: int, options: SamplerOptions | None = None) -> Grid:
        """The grid for ``steps`` steps, as the diffusers scheduler's ``set_timesteps`` with the scheduler
        config's ``options`` (:meth:`SchedulerConfig.resolve`; default: diffusers' SD defaults)."""
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        opts = SamplerOptions() if options is None else options
        if self.schedule_type != "default" and opts.schedule_type == "default":
            opts = dataclasses.replace(opts, schedule_type=self.schedule_type)
        if schedule.rescale_betas_zero_snr and not self.zero_snr:
            raise UnsupportedArchitectureError(
                f"scheduler_config: rescale_betas_zero_snr=True, but diffusers' {self.diffusers_class} does not "
                f"support it (it would silently ignore it); choose ddim, ddpm, euler, euler_a, dpmpp_2m*, unipc or lcm"
            )
        sigmas, ts = self.grid_fn(schedule, steps, opts)
        sigmas, ts = sigmas.astype(np.float32), ts.astype(np.float32)
        extra = self.kwargs(schedule, steps, opts, ts)
        return Grid(sigmas, ts, extra, self.init_sigma(schedule, sigmas), self.ve_output, opts)


def _row(name: str, fn: Callable, grid_fn: Callable, **kw) -> SamplerSpec:
    return SamplerSpec(fn, SAMPLER_CLASSES[name], grid_fn, **kw)


_EULER = dict(init_sigma=grids.ve_init_sigma, ve_output=True)

SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": _row("ddim", os1.sample_ddim, grids.ddim_grid, kwargs=_ddim_kwargs),  # stochastic when eta > 0
    "ddpm": _row("ddpm", os1.sample_ddpm, grids.ddpm_grid),
    "pndm": _row("pndm", ms.sample_pndm, grids.ddim_grid, kwargs=_pndm_kwargs, zero_snr=False),
    "euler": _row("euler", os1.sample_euler, functools.partial(grids.euler_grid, euler_options=True), **_EULER),
    "euler_a": _row("euler_a", os1.sample_euler_ancestral, grids.euler_grid, **_EULER),
    "heun": _row("heun", os1.sample_heun, grids.euler_grid, zero_snr=False, **_EULER),
    "lms": _row("lms", ms.sample_lms, grids.euler_grid, zero_snr=False, **_EULER),
    "dpmpp_2m": _row("dpmpp_2m", ms.sample_dpmpp_2m, grids.dpm_grid, kwargs=_dpm_kwargs),
    "dpmpp_2m_sde": _row("dpmpp_2m_sde", ms.sample_dpmpp_2m_sde, grids.dpm_grid, kwargs=_dpm_kwargs),
    "unipc": _row("unipc", ms.sample_unipc, functools.partial(grids.dpm_grid, unipc=True), kwargs=_unipc_kwargs),
    "lcm": _row("lcm", os1.sample_lcm, grids.lcm_grid, kwargs=_lcm_kwargs),
}
SAMPLERS.update({alias: dataclasses.replace(SAMPLERS[name], schedule_type=stype)
                 for alias, (name, stype) in SCHEDULE_ALIASES.items()})  # fmt: skip


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def sampler_grid(name: str, schedule: NoiseSchedule, steps: int, options: SamplerOptions | None = None) -> Grid:
    """The grid sampler ``name`` walks for ``steps`` steps (:meth:`SamplerSpec.grid`)."""
    return get_sampler(name).grid(schedule, steps, options)


def start_from(grid: Grid, strength: float, x0, noise) -> tuple[int, object]:
    """diffusers img2img's start: ``(start, x_start)``; sample ``grid`` from step ``start`` on, from ``x_start``.

    ``init_timestep = min(int(steps * strength), steps)``, ``start = steps - init_timestep``; ``x_start`` is the
    VE latent at ``sigmas[start]``, diffusers' ``add_noise(x0, noise, timesteps[start])`` (VP ``sqrt(a) x0 +
    sqrt(1 - a) noise`` divided by ``sqrt(a)``; Euler-type schedulers' ``add_noise`` is already ``x0 + sigma
    noise``). Strength 0 leaves nothing to do: ``(steps, x0)``. (diffusers slices ``timesteps[start * order:]``;
    our grid has one entry per step whatever the scheduler's order.)
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    steps = len(grid.sigmas) - 1
    start = steps - min(int(steps * strength), steps)
    if start == steps:
        return steps, x0
    return start, x0 + grid.sigmas[start] * noise


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
           end: int | None = None, x_start=None, noises=None, after_step=None, halt=None, **opts):  # fmt: skip
    """The one sampling entry: a prepared ``denoise`` (:func:`~sd_jax.sampling.denoiser.make_denoiser`) and the
    ``grid`` of :func:`sampler_grid`.

    Runs ``name`` from unit ``noise`` (or ``x_start``, a VE latent at ``sigmas[start]``: :func:`start_from`),
    with the x0 prediction clipped/thresholded as ``grid.options`` say; returns the final latent (VP, or VE for
    the Euler family, as diffusers' loop ends) and the per-step denoised estimates (or None). ``key`` drives
    stochastic samplers (step i uses ``fold_in(key, i)``) unless ``noises`` ``[steps, *shape]`` is given (indexed
    by absolute step). ``opts``: extra sampler options (``eta`` for DDIM). ``hook(i, x, d) -> x`` runs after
    every step and sub-step (inpainting's blend), ``after_step(i)`` after every whole step (progress);
    ``halt(i) -> bool`` (traced) skips the remaining steps once true (an interrupt; see ``loop.integrate``).
    ``end`` stops after step ``end - 1``, at ``sigmas[end]`` (diffusers' ``denoising_end``: the result is the
    latent there, VP or VE as at the end, which a refiner's ``denoising_start`` continues from).
    """
    spec = get_sampler(name)
    denoise = process_x0(denoise, grid.options)
    x = x_start if x_start is not None else noise * grid.init_sigma
    sigmas = jnp.asarray(grid.sigmas)
    ends = {} if end is None else {"end": end}
    out = spec.fn(denoise, x, sigmas, key, ts=jnp.asarray(grid.ts), noises=noises, start=start, hook=hook,
                  record=record, after_step=after_step, halt=halt, **ends, **grid.extra, **opts)  # fmt: skip
    x, ds = out if record else (out, None)
    if not grid.ve_output:
        x = x / jnp.sqrt(sigmas[-1 if end is None else end] ** 2 + 1.0)
    return x, ds


def cutoff_step(grid: Grid, fraction: float, num_train_timesteps: int = 1000) -> int:
    """The grid step where diffusers' ``denoising_end`` / ``denoising_start`` ``fraction`` splits the run: the
    number of steps whose timestep is at or above ``round(T - fraction * T)`` (``StableDiffusionXLPipeline``:
    the base runs those; ``StableDiffusionXLImg2ImgPipeline.get_timesteps``: the refiner starts after them)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"denoising_start/denoising_end must lie strictly between 0 and 1, got {fraction!r}")
    cut = int(round(num_train_timesteps - fraction * num_train_timesteps))
    return int(np.sum(np.asarray(grid.ts[:-1]) >= cut))
