"""Samplers: small pure functions over a denoiser, each one ``lax.scan`` over the steps.

Every sampler has the signature ``sampler(denoise, x, sigmas, ts, key) -> step``:
it is given the VE-space denoiser ``denoise(x, sigma, t) -> x0`` and returns a
per-step function; :func:`integrate` runs it under ``lax.scan``. ``sigmas``
holds ``steps + 1`` noise levels (the last usually 0) and ``ts`` the model
timestep diffusers feeds the U-Net at each of them. Noise for step ``i`` is
``jax.random.fold_in(key, i)``.

``integrate`` also takes an optional ``hook(i, x, denoised) -> x`` run after
each step (masked-latent inpainting blends there) and can return every step's
``denoised`` estimate (the timestep progression grid).
"""

from __future__ import annotations

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


def _noise(key, i, x):
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)


# Each step function: (i, x, state) -> (x, state, denoised), with i the step index.


def euler(denoise, sigmas, ts, key):
    """Euler on the PF-ODE (Karras Alg. 2, gamma=0): diffusers ``EulerDiscreteScheduler``.

    On DDIM's grid it is DDIM with eta=0.
    """

    def step(i, x, state):
        d = denoise(x, sigmas[i], ts[i])
        return x + to_d(x, sigmas[i], d) * (sigmas[i + 1] - sigmas[i]), state, d

    return step, ()


def euler_ancestral(denoise, sigmas, ts, key, eta=1.0):
    """diffusers ``EulerAncestralDiscreteScheduler``."""

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, ts[i])
        down, up = ancestral_step(s, s_next, eta)
        x = x + to_d(x, s, d) * (down - s)
        return x + _noise(key, i, x) * up, state, d

    return step, ()


def heun(denoise, sigmas, ts, key):
    """Heun's 2nd-order method (Karras Alg. 1 without churn): diffusers ``HeunDiscreteScheduler``."""

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d0 = denoise(x, s, ts[i])
        deriv = to_d(x, s, d0)
        x_euler = x + deriv * (s_next - s)

        def correct(_):
            d1 = denoise(x_euler, s_next, ts[i + 1])
            return x + 0.5 * (deriv + to_d(x_euler, s_next, d1)) * (s_next - s)

        # The last step to sigma=0 is a plain Euler step, as in diffusers.
        x = jax.lax.cond(s_next > 0, correct, lambda _: x_euler, None)
        return x, state, d0

    return step, ()


def dpmpp_2m(denoise, sigmas, ts, key):
    """DPM-Solver++(2M) (Lu et al. 2022): diffusers ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2).

    First order on the first step and into sigma=0, as diffusers' ``lower_order_final``.
    """

    def step(i, x, state):
        old, have_old = state
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, ts[i])
        t, t_next = -jnp.log(s), -jnp.log(jnp.maximum(s_next, 1e-30))
        h = t_next - t
        first = jnp.logical_not(have_old) | (s_next == 0)
        h_last = t - (-jnp.log(sigmas[jnp.maximum(i - 1, 0)]))
        r = h_last / jnp.where(first, 1.0, h)
        d_2 = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        d_used = jnp.where(first, d, d_2)
        x = jnp.where(s_next == 0, d, (s_next / s) * x - jnp.expm1(-h) * d_used)
        return x, (d, jnp.asarray(True)), d

    return step, None


def dpmpp_2m_sde(denoise, sigmas, ts, key):
    """DPM-Solver++(2M) SDE, midpoint form.

    diffusers ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``.
    """

    def step(i, x, state):
        old, have_old = state
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, ts[i])
        t, t_next = -jnp.log(s), -jnp.log(jnp.maximum(s_next, 1e-30))
        h = t_next - t
        first = jnp.logical_not(have_old) | (s_next == 0)
        h_last = t - (-jnp.log(sigmas[jnp.maximum(i - 1, 0)]))
        r = h_last / jnp.where(first, 1.0, h)
        # diffusers' midpoint form: x = s'/s e^{-h} x + (1 - e^{-2h}) D + 0.5 (1 - e^{-2h}) (D - D_old)/r + noise
        x1 = (s_next / s) * jnp.exp(-h) * x + (-jnp.expm1(-2 * h)) * d
        x1 = x1 + jnp.where(first, 0.0, 0.5 * (-jnp.expm1(-2 * h)) * (d - old) / r)
        x1 = x1 + s_next * jnp.sqrt(jnp.maximum(-jnp.expm1(-2 * h), 0.0)) * _noise(key, i, x)
        return jnp.where(s_next == 0, d, x1), (d, jnp.asarray(True)), d

    return step, None


# -- VP-space (discrete-time) samplers. With a = 1 / (1 + sigma^2): x_VP = sqrt(a) x_VE, eps = (x_VE - x0) / sigma --


def _alpha(sigma):
    return 1.0 / (1.0 + sigma**2)


def ddim(denoise, sigmas, ts, key, eta=0.0):
    """DDIM (Song et al. 2021), diffusers ``DDIMScheduler`` with ``eta``; eta=0 is the Euler step on DDIM's grid."""

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, ts[i])
        eps = (x - d) / s
        a, a_p = _alpha(s), _alpha(s_next)
        var = eta**2 * (1 - a_p) / (1 - a) * (1 - a / a_p)
        x_vp = jnp.sqrt(a_p) * d + jnp.sqrt(jnp.maximum(1 - a_p - var, 0.0)) * eps + jnp.sqrt(var) * _noise(key, i, x)
        return x_vp / jnp.sqrt(a_p), state, d

    return step, ()


def ddpm(denoise, sigmas, ts, key):
    """Ancestral DDPM (Ho et al. 2020), diffusers ``DDPMScheduler`` (variance_type="fixed_small")."""

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, ts[i])
        a, a_p = _alpha(s), _alpha(s_next)
        beta = 1 - a / a_p
        mean = jnp.sqrt(a_p) * beta / (1 - a) * d + jnp.sqrt(a / a_p) * (1 - a_p) / (1 - a) * (jnp.sqrt(a) * x)
        var = jnp.maximum((1 - a_p) / (1 - a) * beta, 1e-20)
        x_vp = mean + jnp.where(ts[i] > 0, jnp.sqrt(var), 0.0) * _noise(key, i, x)
        return x_vp / jnp.sqrt(a_p), state, d

    return step, ()


def lcm(denoise, sigmas, ts, key, timestep_scaling=10.0, sigma_data=0.5):
    """Latent Consistency Model sampling (Luo et al. 2023), diffusers ``LCMScheduler``."""

    def step(i, x, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, s, ts[i])
        a, a_p = _alpha(s), _alpha(s_next)
        scaled = ts[i] * timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
        d = c_out * x0 + c_skip * jnp.sqrt(a) * x  # the consistency boundary condition, on the VP sample
        last = i == sigmas.shape[0] - 2
        x_vp = jnp.where(last, d, jnp.sqrt(a_p) * d + jnp.sqrt(1 - a_p) * _noise(key, i, x))
        return x_vp / jnp.sqrt(a_p), state, d

    return step, ()


def pndm(denoise, sigmas, ts, key):
    """PLMS, diffusers ``PNDMScheduler(skip_prk_steps=True)``: a Heun-like first step, then 4th-order
    Adams-Bashforth (Liu et al. 2022). As in diffusers the history holds raw model outputs (eps or v)
    and the combination is turned into eps at the current step."""
    v_pred = getattr(denoise, "prediction_type", "epsilon") == "v_prediction"

    def raw(x, k):
        s = sigmas[k]
        d = denoise(x, s, ts[k])
        if not v_pred:
            return (x - d) / s, d
        a = _alpha(s)
        return (a * x - d) / jnp.sqrt(1 - a), d  # v, from x0 = sqrt(a) x_vp - sqrt(1 - a) v

    def to_eps(out, x, k):
        if not v_pred:
            return out
        a = _alpha(sigmas[k])
        return jnp.sqrt(a) * out + jnp.sqrt(1 - a) * jnp.sqrt(a) * x

    def step(i, x, state):
        buf, count = state  # buf[0] newest previous output
        s, s_next = sigmas[i], sigmas[i + 1]
        e, d = raw(x, i)

        def first(_):
            e1, _ = raw(x + (s_next - s) * to_eps(e, x, i), i + 1)
            return (e + e1) / 2

        def plms(_):
            two = (3 * e - buf[0]) / 2
            three = (23 * e - 16 * buf[0] + 5 * buf[1]) / 12
            four = (55 * e - 59 * buf[0] + 37 * buf[1] - 9 * buf[2]) / 24
            return jnp.where(count == 1, two, jnp.where(count == 2, three, four))

        e_used = to_eps(jax.lax.cond(count == 0, first, plms, None), x, i)
        buf = jnp.concatenate([e[None], buf[:-1]])
        return x + (s_next - s) * e_used, (buf, count + 1), d

    return step, "pndm"


def lms_coefficients(sigmas, order: int = 4):
    """diffusers ``LMSDiscreteScheduler.get_lms_coefficient``: integrals of Lagrange bases over each sigma step.

    Gauss-Legendre quadrature with 8 nodes is exact for these cubics; traceable, so it runs inside ``jit``.
    """
    import numpy as np

    nodes, weights = (jnp.asarray(a, jnp.float32) for a in np.polynomial.legendre.leggauss(8))
    n = sigmas.shape[0] - 1
    rows = []
    for t in range(n):
        o = min(t + 1, order)
        lo, hi = sigmas[t], sigmas[t + 1]
        tau = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        row = []
        for j in range(order):
            if j >= o:
                row.append(jnp.zeros(()))
                continue
            prod = jnp.ones_like(tau)
            for k in range(o):
                if k != j:
                    prod = prod * (tau - sigmas[t - k]) / (sigmas[t - j] - sigmas[t - k])
            row.append(0.5 * (hi - lo) * jnp.sum(weights * prod))
        rows.append(jnp.stack(row))
    return jnp.stack(rows)


def lms(denoise, sigmas, ts, key, coefficients=None):
    """Linear multistep on the PF-ODE, diffusers ``LMSDiscreteScheduler`` (order 4)."""

    if coefficients is None:
        coefficients = lms_coefficients(sigmas)

    def step(i, x, state):
        buf, count = state
        d = denoise(x, sigmas[i], ts[i])
        buf = jnp.concatenate([to_d(x, sigmas[i], d)[None], buf[:-1]])
        c = coefficients[i]
        x = x + sum(c[j] * buf[j] for j in range(4))
        return x, (buf, count + 1), d

    return step, "lms"


def unipc(denoise, sigmas, ts, key):
    """UniPC (Zhao et al. 2023), diffusers ``UniPCMultistepScheduler`` (bh2, order 2, predict x0, corrector on).

    In VE space with lambda = -log sigma. The corrector refines the previous step's prediction with the
    model output at it (no extra evaluation); the predictor then takes the next step.
    """
    lam = -jnp.log(jnp.maximum(sigmas, 1e-30))
    n = sigmas.shape[0] - 1

    def coeffs(h):
        hh = -h
        h_phi_1 = jnp.expm1(hh)
        b_h = h_phi_1
        h_phi_k = h_phi_1 / hh - 1
        b1 = h_phi_k / b_h
        h_phi_k = h_phi_k / hh - 0.5
        b2 = h_phi_k * 2 / b_h
        return h_phi_1, b_h, b1, b2

    def step(i, x, state):
        x_prev, m_prev, m_prev2, count, prev_order = state
        s, s_next = sigmas[i], sigmas[i + 1]
        m = denoise(x, s, ts[i])

        # corrector (UniC) for x, predicted from x_prev at step i-1
        im1, im2 = jnp.maximum(i - 1, 0), jnp.maximum(i - 2, 0)
        h = lam[i] - lam[im1]
        h_phi_1, b_h, b1, b2 = coeffs(jnp.where(count > 0, h, 1.0))
        rk = (lam[im2] - lam[im1]) / jnp.where(count > 0, h, 1.0)
        r0 = (b1 - b2) / (1 - rk)
        rho = jnp.where(prev_order == 2, jnp.stack([r0, b1 - r0]), jnp.stack([0.0 * r0, 0.5 + 0 * r0]))
        d1 = (m_prev2 - m_prev) / rk
        base = (s / sigmas[im1]) * x_prev - h_phi_1 * m_prev
        corrected = base - b_h * (jnp.where(prev_order == 2, rho[0] * d1, 0.0) + rho[1] * (m - m_prev))
        x = jnp.where(count > 0, corrected, x)

        # predictor (UniP), order 2 once there is history, order 1 into the last step
        order = jnp.minimum(jnp.minimum(2, count + 1), n - i)
        h = jnp.where(s_next > 0, lam[i + 1] - lam[i], 1.0)
        h_phi_1, b_h, _, _ = coeffs(h)
        rk_p = (lam[im1] - lam[i]) / h
        d1_p = (m_prev - m) / rk_p
        pred = (s_next / s) * x - h_phi_1 * m - jnp.where(order == 2, b_h * 0.5 * d1_p, 0.0)
        pred = jnp.where(s_next > 0, pred, m)
        return pred, (x, m, m_prev, count + 1, order), m

    return step, "unipc"


SAMPLERS: dict[str, Callable] = {
    "euler": euler,
    "euler_a": euler_ancestral,
    "heun": heun,
    "ddim": ddim,
    "ddpm": ddpm,
    "lcm": lcm,
    "pndm": pndm,
    "lms": lms,
    "unipc": unipc,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_karras": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
}


def integrate(sampler, denoise, x, sigmas, ts, key=None, *, hook=None, record: bool = False, start: int = 0):
    """Run ``sampler`` from step ``start`` to the end in one ``lax.scan``; returns (x, denoised per step or None)."""
    key = jax.random.key(0) if key is None else key
    sigmas, ts = jnp.asarray(sigmas, jnp.float32), jnp.asarray(ts, jnp.float32)
    step, state = sampler(denoise, sigmas, ts, key)
    if state is None:  # multistep: the previous denoised estimate, and whether there is one yet
        state = (jnp.zeros_like(x), jnp.asarray(False))
    elif state == "unipc":  # last sample, last two model outputs, step count, last order
        z = jnp.zeros_like(x)
        state = (z, z, z, jnp.asarray(0), jnp.asarray(1))
    elif isinstance(state, str):  # a history of the last three (pndm) or four (lms) values
        state = (jnp.zeros((3 if state == "pndm" else 4, *x.shape), x.dtype), jnp.asarray(0))

    def body(carry, i):
        x, state = carry
        x, state, d = step(i, x, state)
        if hook is not None:
            x = hook(i, x, d)
        return (x, state), (d if record else None)

    (x, _), ds = jax.lax.scan(body, (x, state), jnp.arange(start, sigmas.shape[0] - 1))
    return x, ds


def sample_euler(denoise, x, sigmas, key=None):
    """Convenience: Euler with the timesteps derived from the sigmas."""
    return integrate(euler, lambda x, s, t: denoise(x, s), x, sigmas, jnp.zeros_like(sigmas), key)[0]


def sample_euler_ancestral(denoise, x, sigmas, key, eta=1.0):
    sampler = lambda d, s, t, k: euler_ancestral(d, s, t, k, eta)  # noqa: E731
    return integrate(sampler, lambda x, s, t: denoise(x, s), x, sigmas, jnp.zeros_like(sigmas), key)[0]


def sample(
    name: str, denoise, noise, sigmas, ts, key=None, *, init_sigma=None, hook=None, record=False, start=0, x_start=None
):
    """Run sampler ``name`` from unit ``noise`` (or ``x_start``, a VE latent at ``sigmas[start]``).

    Returns the final latent in the model's (VP) space, as diffusers' loop ends,
    and the per-step denoised estimates when ``record``.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLERS))}")
    scale = jnp.sqrt(sigmas[0] ** 2 + 1.0) if init_sigma is None else init_sigma
    x = x_start if x_start is not None else noise * scale
    x, ds = integrate(SAMPLERS[name], denoise, x, sigmas, ts, key, hook=hook, record=record, start=start)
    return x / jnp.sqrt(sigmas[-1] ** 2 + 1.0), ds
