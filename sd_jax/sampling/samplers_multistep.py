"""Multistep samplers: PNDM/PLMS, LMS, DPM-Solver++(2M) (+ SDE), UniPC.

Their history (previous outputs, step count) lives in the ``lax.scan`` carry as fixed-size arrays; branches
on "how much history is there yet" are ``jnp.where``/``lax.cond``. Builders and public ``sample_*`` functions
follow :mod:`sd_jax.sampling.loop`. All work on the VE latent with ``lambda = -log sigma``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.parametrization import eps_from_output, output_from_denoised
from sd_jax.sampling.loop import at, reread, sampler, to_d


def _no_history(x):
    return (jnp.zeros_like(x), jnp.asarray(False))


def _dpm_step_terms(i, sigmas, state, order, lower_final):
    """(h, first, r) of a DPM-Solver++ step: first order on the first step (no history), with ``order=1``, and
    on the last step when ``lower_final`` (diffusers: ``euler_at_final``, ``lower_order_final`` under 15 steps, or
    a zero final sigma)."""
    _, have_old = state
    s, s_next = sigmas[i], sigmas[i + 1]
    h = jnp.log(s) - jnp.log(jnp.maximum(s_next, 1e-30))
    first = jnp.logical_not(have_old) | (order == 1)
    if lower_final:
        first = first | (i == sigmas.shape[0] - 2)
    h_last = jnp.log(sigmas[jnp.maximum(i - 1, 0)]) - jnp.log(s)
    return h, first, h_last / jnp.where(first, 1.0, h)


def dpmpp_2m_steps(denoise, sigmas, ts, noise, x, order=2, lower_final=True, solver_type="midpoint"):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): diffusers ``DPMSolverMultistepScheduler``
    (``algorithm_type="dpmsolver++"``, ``solver_order`` 1 or 2, ``solver_type`` midpoint or heun).

    With the history ``D1 = (d - old) / r``: midpoint adds ``-expm1(-h) D1 / 2``, heun ``(expm1(-h) / h + 1) D1``.
    """

    def step(i, x, state):
        old, _ = state
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, at(ts, i))
        h, first, r = _dpm_step_terms(i, sigmas, state, order, lower_final)
        d1 = jnp.where(first, 0.0, (d - old) / r)
        em1 = jnp.expm1(-h)
        second = -0.5 * em1 * d1 if solver_type == "midpoint" else (em1 / h + 1) * d1
        x = jnp.where(s_next == 0, d, (s_next / s) * x - em1 * d + second)
        return x, (d, jnp.asarray(True)), d

    return step, _no_history(x)


def dpmpp_2m_sde_steps(denoise, sigmas, ts, noise, x, order=2, lower_final=True, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion ``sample_dpmpp_2m_sde``): diffusers
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``, midpoint or heun.
    """

    def step(i, x, state):
        old, _ = state
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s, at(ts, i))
        h, first, r = _dpm_step_terms(i, sigmas, state, order, lower_final)
        keep = -jnp.expm1(-2 * h)  # 1 - e^{-2h}
        d1 = jnp.where(first, 0.0, (d - old) / r)
        second = 0.5 * keep * d1 if solver_type == "midpoint" else (keep / (-2 * h) + 1) * d1
        x1 = (s_next / s) * jnp.exp(-h) * x + keep * d + second
        x1 = x1 + s_next * jnp.sqrt(jnp.maximum(keep, 0.0)) * noise(i, x)
        return jnp.where(s_next == 0, d, x1), (d, jnp.asarray(True)), d

    return step, _no_history(x)


def pndm_steps(denoise, sigmas, ts, noise, x, sigmas_to=None, sigmas_restart=None, hook=None):
    """PLMS (Liu et al. 2022, pseudo linear multistep): diffusers ``PNDMScheduler(skip_prk_steps=True)``.

    The first step is Heun-like (two model calls), then 2nd/3rd/4th-order Adams-Bashforth. As in diffusers the
    history holds raw model outputs (eps or v), turned into eps at the step that uses them. ``sigmas_to[i]`` is
    where step i lands (``t - T // steps``) and ``sigmas_restart[i]`` the noise level diffusers assigns the
    start latent in the second half of a first step (``t_{i+1} + T // steps``); both equal the grid under
    ``leading`` spacing, the default. ``hook(i, x, d)`` also sees the first step's half-step.
    """
    # diffusers' PNDM reads v outputs as v and everything else as epsilon (it refuses "sample")
    v_pred = getattr(denoise, "prediction_type", "epsilon") == "v_prediction"
    kind = "v_prediction" if v_pred else "epsilon"
    sigmas_to = sigmas[1:] if sigmas_to is None else jnp.asarray(sigmas_to, jnp.float32)
    sigmas_restart = sigmas[:-1] if sigmas_restart is None else jnp.asarray(sigmas_restart, jnp.float32)

    def raw(x, k):
        s = sigmas[k]
        d = denoise(x, s, at(ts, k))
        return output_from_denoised(kind, d, x, s), d

    def to_eps(out, x, s):
        return eps_from_output(kind, out, x, s)

    def step(i, x, state):
        buf, count = state  # buf[0] is the newest previous output
        s, s_to, s_next = sigmas[i], sigmas_to[i], sigmas[i + 1]
        e, d = raw(x, i)

        def first(_):
            x_mid = reread(x + (s_to - s) * to_eps(e, x, s), s_to, s_next)
            if hook is not None:  # diffusers' inpainting blends after this half too
                x_mid = hook(i, x_mid, d)
            e1, _ = raw(x_mid, i + 1)
            s_from = sigmas_restart[i]
            x_from = reread(x, s, s_from)
            return x_from + (s_next - s_from) * to_eps((e + e1) / 2, x_from, s_from)

        def plms(_):
            two = (3 * e - buf[0]) / 2
            three = (23 * e - 16 * buf[0] + 5 * buf[1]) / 12
            four = (55 * e - 59 * buf[0] + 37 * buf[1] - 9 * buf[2]) / 24
            e_used = jnp.where(count == 1, two, jnp.where(count == 2, three, four))
            return reread(x + (s_to - s) * to_eps(e_used, x, s), s_to, s_next)

        x = jax.lax.cond(count == 0, first, plms, None)
        return x, (jnp.concatenate([e[None], buf[:-1]]), count + 1), d

    return step, (jnp.zeros((3, *x.shape), x.dtype), jnp.asarray(0))


def lms_coefficients(sigmas, order: int = 4):
    """diffusers ``LMSDiscreteScheduler.get_lms_coefficient`` for every step: ``[steps, order]``.

    Integrals over each sigma step of the Lagrange basis polynomials through the last ``min(i + 1, order)``
    sigmas. Gauss-Legendre with 8 nodes is exact for these cubics, and vectorised over steps it runs in-graph.
    """
    nodes, weights = (jnp.asarray(a, jnp.float32) for a in np.polynomial.legendre.leggauss(8))
    n = sigmas.shape[0] - 1
    t = jnp.arange(n)[:, None]
    k = jnp.arange(order)
    o = jnp.minimum(t + 1, order)  # [n, 1]
    hist = sigmas[jnp.maximum(t - k[None, :], 0)]  # [n, order]: the sigma of history entry k
    lo, hi = sigmas[:-1, None], sigmas[1:, None]
    tau = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)  # [n, nodes]
    num = tau[:, None, None, :] - hist[:, None, :, None]  # [n, j, k, nodes]
    den = hist[:, :, None, None] - hist[:, None, :, None]  # [n, j, k, 1]
    use = ((k[None, :] < o)[:, None, :] & (k[:, None] != k[None, :])[None])[..., None]
    basis = jnp.prod(jnp.where(use, num / jnp.where(use, den, 1.0), 1.0), axis=2)  # [n, j, nodes]
    coef = 0.5 * (hi - lo) * jnp.sum(weights * basis, axis=-1)
    return jnp.where(k[None, :] < o, coef, 0.0)


def lms_steps(denoise, sigmas, ts, noise, x, order: int = 4):
    """Linear multistep on the PF-ODE (k-diffusion ``sample_lms``): diffusers ``LMSDiscreteScheduler``."""
    coefficients = lms_coefficients(sigmas, order)

    def step(i, x, buf):
        d = denoise(x, sigmas[i], at(ts, i))
        buf = jnp.concatenate([to_d(x, sigmas[i], d)[None], buf[:-1]])
        return x + jnp.tensordot(coefficients[i], buf, axes=1), buf, d

    return step, jnp.zeros((order, *x.shape), x.dtype)


def _unipc_coeffs(h, bh1=False):
    """Coefficients of diffusers ``UniPCMultistepScheduler`` (predict_x0) for a step of size ``h`` in lambda:
    ``B(h) = -h`` (bh1) or ``expm1(-h)`` (bh2)."""
    h_phi_1 = jnp.expm1(-h)
    b_h = -h if bh1 else h_phi_1
    h_phi_k = h_phi_1 / -h - 1
    b1 = h_phi_k / b_h
    b2 = (h_phi_k / -h - 0.5) * 2 / b_h
    return h_phi_1, b_h, b1, b2


def unipc_steps(denoise, sigmas, ts, noise, x, order=2, lower_order_final=True, solver_type="bh2",
                disable_corrector=()):  # fmt: skip
    """UniPC (Zhao et al. 2023): diffusers ``UniPCMultistepScheduler`` (predict x0, ``solver_type`` bh1/bh2,
    ``solver_order`` 1 or 2, corrector on except at the steps after ``disable_corrector``).

    The corrector refines the previous step's prediction with the model output at it (no extra call); the
    predictor then takes the next step, of order ``min(order, history + 1)`` (and at most the steps left when
    ``lower_order_final``).
    """
    lam = -jnp.log(jnp.maximum(sigmas, 1e-30))
    n = sigmas.shape[0] - 1
    bh1 = solver_type == "bh1"
    skip = jnp.asarray(tuple(disable_corrector) or (-1,))

    def step(i, x, state):
        x_prev, m_prev, m_prev2, count, prev_order = state
        s, s_next = sigmas[i], sigmas[i + 1]
        m = denoise(x, s, at(ts, i))

        # corrector (UniC) for x, which the last step predicted from x_prev
        im1, im2 = jnp.maximum(i - 1, 0), jnp.maximum(i - 2, 0)
        h = jnp.where(count > 0, lam[i] - lam[im1], 1.0)
        h_phi_1, b_h, b1, b2 = _unipc_coeffs(h, bh1)
        rk = (lam[im2] - lam[im1]) / h
        r0 = (b1 - b2) / (1 - rk)
        two = prev_order == 2
        rho0, rho1 = jnp.where(two, r0, 0.0), jnp.where(two, b1 - r0, 0.5)
        base = (s / sigmas[im1]) * x_prev - h_phi_1 * m_prev
        corrected = base - b_h * (jnp.where(two, rho0 * (m_prev2 - m_prev) / rk, 0.0) + rho1 * (m - m_prev))
        use = (count > 0) & jnp.logical_not(jnp.any(skip == i - 1))
        x = jnp.where(use, corrected, x)

        # predictor (UniP)
        this = jnp.minimum(order, count + 1)
        if lower_order_final:
            this = jnp.minimum(this, n - i)
        h = jnp.where(s_next > 0, lam[i + 1] - lam[i], 1.0)
        h_phi_1, b_h, _, _ = _unipc_coeffs(h, bh1)
        rk_p = (lam[im1] - lam[i]) / h
        pred = (s_next / s) * x - h_phi_1 * m - jnp.where(this == 2, b_h * 0.5 * (m_prev - m) / rk_p, 0.0)
        return jnp.where(s_next > 0, pred, m), (x, m, m_prev, count + 1, this), m

    z = jnp.zeros_like(x)
    return step, (z, z, z, jnp.asarray(0), jnp.asarray(1))


sample_dpmpp_2m = sampler(dpmpp_2m_steps)
sample_dpmpp_2m_sde = sampler(dpmpp_2m_sde_steps)
pndm_steps.substep_hook = True
sample_pndm = sampler(pndm_steps)
sample_lms = sampler(lms_steps)
sample_unipc = sampler(unipc_steps)
