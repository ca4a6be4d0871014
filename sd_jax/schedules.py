"""Noise schedules read from a checkpoint's ``scheduler_config.json``.

Everything here is host-side numpy run once per (config, steps): the betas of
the trained discrete diffusion, the inference timesteps (``leading``,
``trailing`` or ``linspace`` spacing with ``steps_offset``, as diffusers'
schedulers compute them) and sigma schedules in k-diffusion's variance-exploding
parametrisation ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_jax.errors import UnsupportedArchitectureError


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training schedule of a checkpoint (diffusers ``SchedulerMixin`` config)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = False

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        kw = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg}
        if cfg.get("trained_betas") is not None:
            raise UnsupportedArchitectureError("scheduler_config: 'trained_betas' is not supported")
        out = cls(**kw)
        if out.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise UnsupportedArchitectureError(
                f"scheduler_config: beta_schedule={out.beta_schedule!r} is not supported"
            )
        if out.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UnsupportedArchitectureError(
                f"scheduler_config: prediction_type={out.prediction_type!r} is not supported"
            )
        return out

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32) ** 2
        else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021, as diffusers' betas_for_alpha_bar

            def f(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float32)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        ac = np.cumprod(1.0 - self.betas(), axis=0).astype(np.float32)
        if self.rescale_betas_zero_snr:  # sigma would be infinite; diffusers' Euler/DPM clamp it the same way
            ac[-1] = 2.0**-24
        return ac

    def sigmas(self) -> np.ndarray:
        """The trained model's sigma at each of the ``num_train_timesteps`` timesteps."""
        ac = self.alphas_cumprod()
        return np.sqrt((1 - ac) / ac).astype(np.float32)

    def timesteps(self, steps: int) -> np.ndarray:
        """Inference timesteps, highest first, as diffusers' ``set_timesteps``."""
        n = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        if self.timestep_spacing == "leading":
            ratio = n // steps
            return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + self.steps_offset
        if self.timestep_spacing == "trailing":
            return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
        raise UnsupportedArchitectureError(f"scheduler_config: timestep_spacing={self.timestep_spacing!r}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1 - alphas).astype(np.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: ``steps`` sigmas from sigma_max down to sigma_min (no trailing zero).

    diffusers' ``_convert_to_karras`` and k-diffusion's ``get_sigmas_karras``.
    """
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho  # float64 as diffusers' (its timesteps are found from these)


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """``steps`` sigmas evenly spaced in log sigma (diffusers ``_convert_to_exponential``, k-diffusion
    ``get_sigmas_exponential``), no trailing zero."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def beta_sigmas(sigma_min: float, sigma_max: float, steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need": sigmas at the Beta(alpha, beta) quantiles of
    ``1 - linspace(0, 1, steps)`` (diffusers ``_convert_to_beta``), no trailing zero."""
    from scipy.special import betaincinv  # scipy ships with jax

    ppf = betaincinv(alpha, beta, 1 - np.linspace(0, 1, steps))
    return sigma_min + ppf * (sigma_max - sigma_min)


def t_to_sigma(t: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """Sigma at fractional timesteps, interpolated in log sigma (k-diffusion ``DiscreteSchedule.t_to_sigma``,
    ComfyUI ``ModelSamplingDiscrete.sigma``)."""
    log_sigmas = np.log(schedule.sigmas().astype(np.float64))
    t = np.clip(np.asarray(t, np.float64), 0, len(log_sigmas) - 1)
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high]).astype(np.float32)


def sgm_uniform_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """A1111's "SGM Uniform" / ComfyUI's ``sgm_uniform``: ``steps`` timesteps evenly spaced from the timestep of
    sigma_max to that of sigma_min, the endpoint left out (``linspace(T - 1, 0, steps + 1)[:-1]``)."""
    n = schedule.num_train_timesteps
    return np.linspace(n - 1, 0, steps + 1)[:-1].astype(np.float32)


def simple_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """ComfyUI's ``simple_scheduler`` (A1111's "Simple"): every ``T / steps``-th trained sigma from the top,
    i.e. integer timesteps ``T - 1 - int(i * T / steps)``."""
    n = schedule.num_train_timesteps
    ratio = n / steps
    return np.array([n - 1 - int(i * ratio) for i in range(steps)], np.float32)


def sigma_to_t(sigma: np.ndarray, schedule: NoiseSchedule) -> np.ndarray:
    """Fractional timestep of each sigma by log-sigma interpolation (diffusers ``_sigma_to_t``, with its dtypes:
    a float32 log table, float64 queries; integer-cast timesteps depend on the last bit)."""
    log_sigmas = np.log(schedule.sigmas()).astype(np.float64)
    sigma = np.asarray(sigma, np.float64)
    log_sigma = np.log(np.maximum(sigma.reshape(-1), 1e-10))
    dists = log_sigma[:, None] - log_sigmas[None, :]
    # Last trained index whose sigma is <= the query.
    low = np.clip((dists >= 0).cumsum(axis=-1).argmax(axis=-1), None, len(log_sigmas) - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)  # float64: an int cast must see 998.9999
