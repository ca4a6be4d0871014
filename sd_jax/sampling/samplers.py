"""Samplers: small pure functions over a VE-space denoiser, each one ``lax.scan`` over its steps.

Every sampler has the k-diffusion signature::

    sample_x(denoise, x, sigmas, key=None, *, ts=None, noises=None, start=0, hook=None, record=False, **opts) -> x

* ``denoise(x, sigma, t)`` -> x0 estimate, with ``x = x_VP / sqrt(alpha_bar)`` and
  ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (:func:`sd_jax.sampling.denoiser.make_denoiser`); a plain
  ``denoise(x, sigma)`` works when ``ts`` is None. Discrete-time (VP) schedulers (DDIM, DDPM, PNDM, LCM,
  UniPC) use the same interface: they convert with ``alpha_bar = 1 / (1 + sigma^2)`` inside the step.
* ``sigmas``: ``steps + 1`` noise levels, the last the final one; ``ts``: the model timestep at each, as the
  diffusers scheduler feeds the U-Net (build both with :func:`sd_jax.sampling.registry.sampler_grid`).
* stochastic samplers draw step i's noise from ``jax.random.fold_in(key, i)``, or ``noises[i]`` if injected.
* ``x`` is the VE latent at ``sigmas[start]``; the result the VE latent at ``sigmas[-1]``.

Step math lives in :mod:`~sd_jax.sampling.samplers_onestep` and :mod:`~sd_jax.sampling.samplers_multistep`,
the scan in :mod:`~sd_jax.sampling.loop`, and the name -> sampler/grid/init-noise registry with
:func:`run_sampler` (what pipelines call) in :mod:`~sd_jax.sampling.registry`.
"""

from sd_jax.sampling.loop import ancestral_step, integrate, to_d
from sd_jax.sampling.registry import (
    SAMPLERS,
    SCHEDULE_TYPES,
    Grid,
    SamplerSpec,
    blend_hook,
    img2img,
    img2img_start,
    init_noise_sigma,
    noised_start,
    run_sampler,
    sample,
    sampler_grid,
)
from sd_jax.sampling.samplers_multistep import (
    lms_coefficients,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_lms,
    sample_pndm,
    sample_unipc,
)
from sd_jax.sampling.samplers_onestep import (
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULE_TYPES",
    "blend_hook",
    "Grid",
    "SamplerSpec",
    "ancestral_step",
    "img2img",
    "img2img_start",
    "init_noise_sigma",
    "integrate",
    "lms_coefficients",
    "noised_start",
    "run_sampler",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_pndm",
    "sample_unipc",
    "sampler_grid",
    "to_d",
]
