"""Per-sampler noise-level grids: ``(sigmas[steps + 1], ts[steps + 1])``, as each diffusers scheduler builds them.

The schedulers differ in how they place timesteps (DPM-Solver divides by
``steps + 1``, Euler keeps fractional linspace timesteps, Karras sigmas are
spaced in sigma and rounded back to timesteps). Matching them here is what makes
trajectories agree with diffusers step for step.
"""

from __future__ import annotations

import numpy as np

from sd_jax.schedules import NoiseSchedule, karras_sigmas, sigma_to_t


def _interp(schedule: NoiseSchedule, ts: np.ndarray) -> np.ndarray:
    table = schedule.sigmas()
    return np.interp(ts, np.arange(len(table)), table).astype(np.float32)


def _dpm_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    n = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.float32)
    if schedule.timestep_spacing == "leading":
        ratio = n // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.float32) + schedule.steps_offset
    return (np.arange(n, 0, -n / steps).round() - 1).astype(np.float32)


def lcm_timesteps(schedule: NoiseSchedule, steps: int, original_steps: int = 50) -> np.ndarray:
    """diffusers ``LCMScheduler``: ``steps`` of the 50 distillation timesteps, evenly from the top."""
    k = schedule.num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.float32)


def sampler_grid(name: str, schedule: NoiseSchedule, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The (sigmas, model timesteps) a sampler walks, both with ``steps + 1`` entries."""
    if name in ("dpmpp_2m", "dpmpp_2m_sde", "unipc"):
        ts = _dpm_timesteps(schedule, steps)
        return np.append(_interp(schedule, ts), 0.0).astype(np.float32), np.append(ts, 0.0).astype(np.float32)
    if name == "dpmpp_2m_karras":
        table = schedule.sigmas()
        sig = karras_sigmas(float(table[0]), float(table[-1]), steps)
        ts = sigma_to_t(sig, schedule)
        if schedule.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        return np.append(sig, 0.0).astype(np.float32), np.append(ts, 0.0).astype(np.float32)
    if name == "lcm":
        ts = lcm_timesteps(schedule, steps)
        return np.append(schedule.sigmas()[ts.astype(int)], 0.0).astype(np.float32), np.append(ts, 0.0)
    ts = schedule.timesteps(steps)
    if name == "ddpm":
        ts = ts.round()
        return np.append(schedule.sigmas()[ts.astype(int)], 0.0).astype(np.float32), np.append(ts, 0.0)
    if name in ("ddim", "pndm"):
        ts = ts.round()
        table = schedule.sigmas()
        last = 0.0 if schedule.set_alpha_to_one else float(table[0])
        return np.append(table[ts.astype(int)], last).astype(np.float32), np.append(ts, 0.0).astype(np.float32)
    if name in ("euler", "euler_a", "heun", "lms"):
        return np.append(_interp(schedule, ts), 0.0).astype(np.float32), np.append(ts, 0.0).astype(np.float32)
    raise ValueError(f"unknown sampler {name!r}")


def init_noise_sigma(name: str, schedule: NoiseSchedule, sigmas: np.ndarray) -> float:
    """The scale diffusers puts on unit noise (``init_noise_sigma``), in VE space.

    VP-space schedulers (DDIM, DPM-Solver) start at x_T = noise, i.e. VE
    ``noise * sqrt(sigma_0^2 + 1)``; Euler-type ones use ``sqrt(sigma_max^2 + 1)``
    for leading spacing and ``sigma_max`` for linspace/trailing, as diffusers.
    """
    s0 = float(sigmas[0])
    if name in ("euler", "euler_a", "heun", "lms") and schedule.timestep_spacing in ("linspace", "trailing"):
        return s0
    return float(np.sqrt(s0**2 + 1))
