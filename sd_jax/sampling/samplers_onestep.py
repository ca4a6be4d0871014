"""One-step samplers (no history): Euler, Euler ancestral, Heun, DDIM, DDPM, LCM.

Each ``*_steps`` is a step builder (see :mod:`sd_jax.sampling.loop`) and each ``sample_*`` the public
``sample_x(denoise, x, sigmas, key=None, *, ts=None, noises=None, start=0, hook=None, record=False, **opts)``.
All work on the VE latent ``x = x_VP / sqrt(alpha_bar)``; the discrete-time (VP) samplers convert at each step
with ``alpha_bar = 1 / (1 + sigma^2)``, which is exact, so they match diffusers' VP-space update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sd_jax.sampling.loop import alpha_bar, ancestral_step, at, reread, sampler, to_d


def euler_steps(denoise, sigmas, ts, noise, x):
    """Euler on the PF-ODE (Karras et al. 2022, Alg. 2 without churn): diffusers ``EulerDiscreteScheduler``."""

    def step(i, x, state):
        d = denoise(x, sigmas[i], at(ts, i))
        return x + to_d(x, sigmas[i], d) * (sigmas[i + 1] - sigmas[i]), state, d

    return step, ()


def euler_ancestral_steps(denoise, sigmas, ts, noise, x, eta=1.0):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``): diffusers ``EulerAncestralDiscreteScheduler``."""

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, at(ts, i))
        down, up = ancestral_step(s, s_next, eta)
        x = x + to_d(x, s, d) * (down - s)
        return x + noise(i, x) * up, state, d

    return step, ()


def heun_steps(denoise, sigmas, ts, noise, x, hook=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn): diffusers ``HeunDiscreteScheduler``.

    ``hook(i, x, d)`` also sees the Euler half-step (diffusers' inpainting blends after every ``step()`` call).
    """

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d0 = denoise(x, s, at(ts, i))
        deriv = to_d(x, s, d0)
        x_euler = x + deriv * (s_next - s)

        def correct(_):
            xe = x_euler if hook is None else hook(i, x_euler, d0)
            d1 = denoise(xe, s_next, at(ts, i + 1))
            return x + 0.5 * (deriv + to_d(xe, s_next, d1)) * (s_next - s)

        # The last step to sigma=0 is a plain Euler step, as in diffusers.
        return jax.lax.cond(s_next > 0, correct, lambda _: x_euler, None), state, d0

    return step, ()


def ddim_steps(denoise, sigmas, ts, noise, x, eta=0.0, sigmas_to=None):
    """DDIM (Song et al. 2021, eq. 12): diffusers ``DDIMScheduler.step`` with ``eta``.

    ``sigmas_to[i]`` is where step i lands: diffusers steps to ``t - T // steps`` (the next grid point under
    ``leading`` spacing, not always otherwise); default ``sigmas[1:]``. eta=0 is Euler on this grid.
    """
    sigmas_to = sigmas[1:] if sigmas_to is None else jnp.asarray(sigmas_to, jnp.float32)

    raw = getattr(denoise, "unclipped", denoise)
    clip = getattr(denoise, "clip_x0", lambda x0: x0)

    def step(i, x, state):
        s, s_to = sigmas[i], sigmas_to[i]
        d_raw = raw(x, s, at(ts, i))
        eps = (x - d_raw) / s  # the model's epsilon; x0 is clipped (diffusers' use_clipped_model_output=False)
        d = clip(d_raw)
        a, a_p = alpha_bar(s), alpha_bar(s_to)
        var = eta**2 * (1 - a_p) / (1 - a) * (1 - a / a_p)
        x_vp = jnp.sqrt(a_p) * d + jnp.sqrt(jnp.maximum(1 - a_p - var, 0.0)) * eps
        if not (isinstance(eta, (int, float)) and eta == 0):  # a Python eta=0 draws no noise, needs no key
            x_vp = x_vp + jnp.sqrt(var) * noise(i, x)
        return reread(x_vp / jnp.sqrt(a_p), s_to, sigmas[i + 1]), state, d

    return step, ()


def ddpm_steps(denoise, sigmas, ts, noise, x):
    """Ancestral DDPM (Ho et al. 2020, eq. 6-7): diffusers ``DDPMScheduler`` (``variance_type="fixed_small"``)."""

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, at(ts, i))
        a, a_p = alpha_bar(s), alpha_bar(s_next)
        beta = 1 - a / a_p
        mean = jnp.sqrt(a_p) * beta / (1 - a) * d + jnp.sqrt(a / a_p) * (1 - a_p) / (1 - a) * (jnp.sqrt(a) * x)
        var = jnp.maximum((1 - a_p) / (1 - a) * beta, 1e-20)
        # diffusers adds no noise at t=0 (it still draws none there).
        t_pos = s_next > 0 if ts is None else ts[i] > 0
        x_vp = mean + jnp.where(t_pos, jnp.sqrt(var), 0.0) * noise(i, x)
        return x_vp / jnp.sqrt(a_p), state, d

    return step, ()


def lcm_steps(denoise, sigmas, ts, noise, x, timestep_scaling=10.0, sigma_data=0.5):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 3): diffusers ``LCMScheduler``.

    The consistency boundary condition ``c_skip x + c_out x0`` is applied to the VP sample, then re-noised to
    the next timestep with fresh noise (none after the last step). Needs ``ts`` (it scales the timestep).
    """

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, s, ts[i])
        a, a_p = alpha_bar(s), alpha_bar(s_next)
        scaled = ts[i] * timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
        d = c_out * x0 + c_skip * jnp.sqrt(a) * x
        last = i == sigmas.shape[0] - 2
        x_vp = jnp.where(last, d, jnp.sqrt(a_p) * d + jnp.sqrt(1 - a_p) * noise(i, x))
        return x_vp / jnp.sqrt(a_p), state, d

    return step, ()


sample_euler = sampler(euler_steps)
sample_euler_ancestral = sampler(euler_ancestral_steps)
heun_steps.substep_hook = True
sample_heun = sampler(heun_steps)
sample_ddim = sampler(ddim_steps)
sample_ddpm = sampler(ddpm_steps)
sample_lcm = sampler(lcm_steps)
