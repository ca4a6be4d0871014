"""Per-sampler noise-level grids: ``(sigmas[steps + 1], ts[steps + 1])``, as each diffusers scheduler builds them.

The schedulers differ in how they place timesteps (DPM-Solver divides by ``steps + 1``, Euler keeps fractional
linspace timesteps, Karras sigmas are spaced in sigma and rounded back to timesteps). Matching them here is what
makes trajectories agree with diffusers step for step. One function per scheduler family; each registry row
(:class:`~sd_jax.sampling.registry.SamplerSpec`) names its grid and its ``init_noise_sigma``.

Schedule types (A1111's "Schedule type", k-diffusion's ``get_sigmas_*``) replace the sigmas of the Euler family
(euler, euler_a, heun, lms) and of the DPM family (dpmpp_2m*, unipc):

* ``karras``, ``exponential``, ``beta``: diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
  ``use_beta_sigmas`` of that scheduler, numerically (the Euler family spans the sigmas of its spaced
  timesteps, the DPM family the whole trained table; timesteps back by log-sigma interpolation, rounded or
  truncated to integers where the diffusers class does). euler_a, which has no such option in diffusers, uses
  EulerDiscreteScheduler's.
* ``sgm_uniform``: A1111 / ComfyUI ``sgm_uniform``: timesteps ``linspace(T - 1, 0, steps + 1)[:-1]``, sigma by
  log-linear interpolation of the trained table.
* ``simple``: ComfyUI ``simple_scheduler`` (A1111 "Simple"): every ``T / steps``-th trained sigma from the top.
"""

from __future__ import annotations

import numpy as np

from sd_jax.sampling.scheduler_config import SamplerOptions
from sd_jax.schedules import (
    NoiseSchedule,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sgm_uniform_timesteps,
    sigma_to_t,
    simple_timesteps,
    t_to_sigma,
)

CONVERT = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def _interp(schedule: NoiseSchedule, ts: np.ndarray) -> np.ndarray:
    table = schedule.sigmas()
    return np.interp(ts, np.arange(len(table)), table).astype(np.float32)


def _last_timestep(schedule: NoiseSchedule, lambda_min_clipped: float) -> int:
    """DPMSolverMultistep's ``last_timestep``: ``T`` minus the timesteps whose lambda is below the clip."""
    ac = schedule.alphas_cumprod()
    lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
    return schedule.num_train_timesteps - int(np.searchsorted(lam[::-1], lambda_min_clipped))


def _dpm_timesteps(schedule: NoiseSchedule, steps: int, lambda_min_clipped: float = -np.inf) -> np.ndarray:
    n = schedule.num_train_timesteps
    last = _last_timestep(schedule, lambda_min_clipped) if lambda_min_clipped > -np.inf else n
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.float32)
    if schedule.timestep_spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.float32) + schedule.steps_offset
    return (np.arange(last, 0, -n / steps).round() - 1).astype(np.float32)


def lcm_timesteps(schedule: NoiseSchedule, steps: int, original_steps: int = 50) -> np.ndarray:
    """diffusers ``LCMScheduler``: ``steps`` of the ``original_steps`` distillation timesteps, evenly from the top."""
    k = schedule.num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.float32)


def _typed(stype, schedule, steps, lo, hi):
    """(sigmas[steps], fractional ts) of a non-default schedule type between sigmas ``lo`` and ``hi``."""
    if stype in CONVERT:
        sig = CONVERT[stype](lo, hi, steps)
        return sig, sigma_to_t(sig, schedule)
    if stype == "sgm_uniform":
        ts = sgm_uniform_timesteps(schedule, steps)
        return t_to_sigma(ts, schedule), ts
    ts = simple_timesteps(schedule, steps)  # "simple"
    return schedule.sigmas()[ts.astype(int)], ts


def euler_grid(schedule: NoiseSchedule, steps: int, opts: SamplerOptions, *, euler_options: bool = False):
    """The Euler family (``EulerDiscreteScheduler`` and the euler_a, heun, lms classes): the sigmas of the spaced
    timesteps, interpolated; ``euler_options``: also EulerDiscrete's own ``interpolation_type`` and
    ``final_sigmas_type``."""
    table = schedule.sigmas()
    ts = schedule.timesteps(steps)
    log_linear = euler_options and opts.interpolation_type == "log_linear"
    if log_linear:  # diffusers: steps + 1 sigmas from sigma_max to sigma_min; the step into the last ends there
        base = np.exp(np.linspace(np.log(table[-1]), np.log(table[0]), steps + 1).astype(np.float32))
    else:
        base = _interp(schedule, ts)
    if opts.schedule_type == "default":
        if log_linear:
            return base.astype(np.float32), np.append(ts, 0.0).astype(np.float32)
        sig = base
    else:
        lo = opts.sigma_min if opts.sigma_min is not None else float(base[-1])
        hi = opts.sigma_max if opts.sigma_max is not None else float(base[0])
        sig, ts = _typed(opts.schedule_type, schedule, steps, lo, hi)
    last = float(table[0]) if euler_options and opts.final_sigmas_type == "sigma_min" else 0.0
    return np.append(sig, last).astype(np.float32), np.append(ts, 0.0).astype(np.float32)


def dpm_grid(schedule: NoiseSchedule, steps: int, opts: SamplerOptions, *, unipc: bool = False):
    """The DPM family (``DPMSolverMultistepScheduler``; ``unipc``: ``UniPCMultistepScheduler``'s rounding and
    final sigma): timesteps divided over ``steps + 1``, or a schedule type over the whole trained table."""
    table = schedule.sigmas()
    stype = opts.schedule_type
    if stype == "default":
        ts = _dpm_timesteps(schedule, steps, opts.lambda_min_clipped)
        sig = _interp(schedule, ts)
    else:
        lo = opts.sigma_min if opts.sigma_min is not None else float(table[0])
        hi = opts.sigma_max if opts.sigma_max is not None else float(table[-1])
        sig, ts = _typed(stype, schedule, steps, lo, hi)
        if stype == "karras" and (unipc or schedule.beta_schedule != "squaredcos_cap_v2"):
            ts = ts.round()
        if stype in CONVERT:  # diffusers keeps int64 timesteps
            ts = np.trunc(ts)
    last = 0.0
    if opts.final_sigmas_type == "sigma_min":
        last = float(sig[-1]) if unipc and stype in CONVERT else float(table[0])
    return np.append(sig, last).astype(np.float32), np.append(ts, 0.0).astype(np.float32)


def _fixed(opts: SamplerOptions, cls: str) -> None:
    if opts.schedule_type != "default":
        raise ValueError(f"schedule {opts.schedule_type!r} is not available for diffusers' {cls}, which walks its "
                         "own integer timesteps")  # fmt: skip


def ddim_grid(schedule: NoiseSchedule, steps: int, opts: SamplerOptions):
    """``DDIMScheduler`` / ``PNDMScheduler``: the trained sigmas at the rounded spaced timesteps, ending at the
    final ``alpha_bar`` (1 with ``set_alpha_to_one``, else ``alpha_bar_0``)."""
    _fixed(opts, "DDIMScheduler/PNDMScheduler")
    ts = schedule.timesteps(steps).round()
    table = schedule.sigmas()
    last = 0.0 if schedule.set_alpha_to_one else float(table[0])
    return np.append(table[ts.astype(int)], last).astype(np.float32), np.append(ts, 0.0).astype(np.float32)


def ddpm_grid(schedule: NoiseSchedule, steps: int, opts: SamplerOptions):
    """``DDPMScheduler``: the trained sigmas at the rounded spaced timesteps, then 0."""
    _fixed(opts, "DDPMScheduler")
    ts = schedule.timesteps(steps).round()
    return np.append(schedule.sigmas()[ts.astype(int)], 0.0).astype(np.float32), np.append(ts, 0.0)


def lcm_grid(schedule: NoiseSchedule, steps: int, opts: SamplerOptions):
    """``LCMScheduler``: :func:`lcm_timesteps` of the distillation's ``original_inference_steps``, then 0."""
    _fixed(opts, "LCMScheduler")
    ts = lcm_timesteps(schedule, steps, opts.original_inference_steps)
    return np.append(schedule.sigmas()[ts.astype(int)], 0.0).astype(np.float32), np.append(ts, 0.0)


def vp_init_sigma(schedule: NoiseSchedule, sigmas: np.ndarray) -> float:
    """diffusers' ``init_noise_sigma`` of a VP-space scheduler (DDIM, DPM-Solver, ...), in VE space: they start at
    ``x_T = noise``, i.e. VE ``noise * sqrt(sigma_0^2 + 1)``."""
    del schedule
    return float(np.sqrt(float(sigmas[0]) ** 2 + 1))


def ve_init_sigma(schedule: NoiseSchedule, sigmas: np.ndarray) -> float:
    """diffusers' ``init_noise_sigma`` of an Euler-type scheduler: ``sigma_max`` for linspace/trailing spacing,
    ``sqrt(sigma_max^2 + 1)`` for leading (whatever the schedule type)."""
    s = float(np.max(sigmas))
    return s if schedule.timestep_spacing in ("linspace", "trailing") else float(np.sqrt(s**2 + 1))
