"""Sampler trajectories against diffusers' PyTorch schedulers, on a fixed fake model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.sampling.denoiser import make_denoiser
from sd_jax.sampling.registry import SAMPLERS, sample, sampler_grid, start_from
from sd_jax.sampling.samplers_multistep import lms_coefficients
from sd_jax.sampling.scheduler_config import SamplerOptions
from sd_jax.schedules import NoiseSchedule, karras_sigmas, sigma_to_t

SD15 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)


def fake_model_np(x, t):
    """Deterministic stand-in for a U-Net, smooth in x and t."""
    return 0.7 * np.tanh(x) + 0.05 * np.cos(t / 100.0 + x)


def assert_close(ours, ref, tol=1e-5):
    """Max abs error <= tol relative to the trajectory's scale (fp32 rounding of O(10) values)."""
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(ours) - ref).max())
    assert err <= tol * scale, (err, scale)


def fake_model_jax(x, t, cond):
    del cond
    return 0.7 * jnp.tanh(x) + 0.05 * jnp.cos(t / 100.0 + x)


def run(name, schedule, grid, noise, key=None, *, model=fake_model_jax, strength=None, x0=None, record=False,
        **kw):  # fmt: skip
    """What the pipeline's loop runs: ``make_denoiser`` + ``sample`` on ``grid`` (``sampler_grid``), from
    ``start_from``'s start when ``strength`` is given (img2img). Returns the latent (and per-step x0 if ``record``)."""
    start, x_start = 0, None
    if strength is not None:
        start, x_start = start_from(grid, strength, x0, noise)
    x, ds = sample(name, make_denoiser(model, schedule, None), noise, grid, key, start=start, x_start=x_start,
                   record=record, **kw)  # fmt: skip
    return (x, ds) if record else x


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_rules(spacing):
    s = NoiseSchedule(timestep_spacing=spacing)
    ts = s.timesteps(20)
    assert ts.shape == (20,) and ts[0] > ts[-1]
    if spacing == "leading":
        np.testing.assert_array_equal(ts[:3], [951, 901, 851])
    if spacing == "trailing":
        np.testing.assert_array_equal(ts[:2], [999, 949])


def test_sigma_to_t_inverts_integer_timesteps():
    s = NoiseSchedule()
    ts = np.array([1.0, 21.0, 500.0, 999.0])
    np.testing.assert_allclose(sigma_to_t(s.sigmas()[ts.astype(int)], s), ts, atol=1e-3)


def test_karras_endpoints():
    k = karras_sigmas(0.03, 14.6, 10)
    np.testing.assert_allclose([k[0], k[-1]], [14.6, 0.03], rtol=1e-6)
    assert np.all(np.diff(k) < 0)


@pytest.mark.live
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_matches_diffusers(prediction_type, spacing):
    import torch
    from diffusers import EulerDiscreteScheduler

    cfg = dict(SD15, prediction_type=prediction_type, timestep_spacing=spacing)
    ref = EulerDiscreteScheduler(**{k: v for k, v in cfg.items() if k not in ("set_alpha_to_one", "clip_sample")})
    ref.set_timesteps(12)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(noise) * ref.init_noise_sigma
    for t in ref.timesteps:
        eps = torch.from_numpy(fake_model_np(ref.scale_model_input(x, t).numpy(), float(t)).astype(np.float32))
        x = ref.step(eps, t, x).prev_sample

    sched = NoiseSchedule.from_diffusers_config(cfg)
    grid = sampler_grid("euler", sched, 12)
    # init_noise_sigma: sqrt(sigma_max^2 + 1) under leading spacing, sigma_max under trailing
    expect = np.sqrt(grid.sigmas[0] ** 2 + 1) if spacing == "leading" else grid.sigmas[0]
    np.testing.assert_allclose(grid.init_sigma, expect, rtol=1e-6)
    out = np.asarray(jax.jit(lambda n: run("euler", sched, grid, n))(jnp.asarray(noise)))
    assert_close(out, x.numpy())


@pytest.mark.live
def test_ddim_eta0_is_euler_on_ddim_sigmas():
    import torch
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SD15)
    ref.set_timesteps(10)
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        eps = torch.from_numpy(fake_model_np(x.numpy(), float(t)).astype(np.float32))
        x = ref.step(eps, t, x, eta=0.0).prev_sample

    sched = NoiseSchedule.from_diffusers_config(SD15)
    # Euler ending at sigma_min under leading spacing walks DDIM's grid (and starts at its sqrt(sigma_0^2 + 1))
    grid = sampler_grid("euler", sched, 10, SamplerOptions(final_sigmas_type="sigma_min"))
    np.testing.assert_array_equal(grid.sigmas, sampler_grid("ddim", sched, 10).sigmas)
    out = run("euler", sched, grid, jnp.asarray(noise))
    out = np.asarray(out) / np.sqrt(grid.sigmas[-1] ** 2 + 1)  # the Euler family ends in VE: back to the VP latent
    assert_close(out, x.numpy())


def test_euler_ancestral_is_deterministic_per_key():
    sched = NoiseSchedule()
    grid = sampler_grid("euler_a", sched, 6)
    x = jnp.ones((1, 4, 4, 4))
    a, b, c = (run("euler_a", sched, grid, x, jax.random.key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 1e-3


# -- every sampler, through the functions the pipeline calls (make_denoiser, sampler_grid, start_from, sample) --

ALL = sorted(SAMPLERS)
STOCHASTIC = ["ddpm", "dpmpp_2m_sde", "euler_a", "lcm"]


def make_counting_model():
    """fake_model_jax plus a Python counter of how often it is traced (one per compile per call site)."""
    traces = []

    def model(x, t, cond):
        traces.append(1)
        return fake_model_jax(x, t, cond)

    return model, traces


@pytest.mark.parametrize("name", ALL)
def test_sampler_shapes_and_finite(name):
    sched = NoiseSchedule()
    noise = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    grid = sampler_grid(name, sched, 4)
    out, ds = jax.jit(lambda n, k: run(name, sched, grid, n, k, record=True))(noise, jax.random.key(1))
    assert out.shape == noise.shape and out.dtype == jnp.float32
    assert ds.shape == (4, *noise.shape)
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("name", STOCHASTIC + ["ddim"])
def test_stochastic_samplers_are_deterministic_per_key(name):
    sched = NoiseSchedule()
    opts = {"eta": 0.8} if name == "ddim" else {}
    grid = sampler_grid(name, sched, 4)
    fn = jax.jit(lambda n, k: run(name, sched, grid, n, k, **opts))
    noise = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
    a, b, c = fn(noise, jax.random.key(5)), fn(noise, jax.random.key(5)), fn(noise, jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 1e-3
    # The key path draws step i's noise from fold_in(key, i): injecting exactly that gives the same result.
    injected = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.key(5), i), noise.shape) for i in range(4)])
    d = jax.jit(lambda n, z: run(name, sched, grid, n, noises=z, **opts))(noise, injected)
    np.testing.assert_allclose(np.asarray(d), np.asarray(a), atol=1e-5)  # different fusion


def test_after_step_sees_whole_steps_and_hook_sees_sub_steps():
    """Heun/PNDM hand the hook their half-steps too (inpainting blends there); after_step counts steps only."""
    sched = NoiseSchedule()
    for name, calls in (("heun", 4 + 3), ("pndm", 4 + 1), ("euler", 4)):
        hooks, steps = [], []

        def hook(i, x, d, seen=hooks):
            jax.debug.callback(lambda i: seen.append(int(i)), i)
            return x

        def after(i, seen=steps):
            jax.debug.callback(lambda i: seen.append(int(i)), i)

        out = run(name, sched, sampler_grid(name, sched, 4), jnp.ones((1, 4, 4, 4)), hook=hook, after_step=after)
        jax.block_until_ready(out)
        jax.effects_barrier()
        assert sorted(steps) == [0, 1, 2, 3], name
        assert len(hooks) == calls, (name, sorted(hooks))


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m", "pndm", "unipc"])
def test_one_compile_per_shape_and_steps(name):
    sched = NoiseSchedule()
    model, traces = make_counting_model()
    grid = sampler_grid(name, sched, 5)
    fn = jax.jit(lambda n, k: run(name, sched, grid, n, k, model=model))
    for seed in range(3):  # new noise and key: no retrace
        fn(jax.random.normal(jax.random.key(seed), (1, 8, 8, 4)), jax.random.key(seed))
    once = len(traces)
    assert once in (1, 2)  # PNDM's Heun-like first step calls the model in a second branch of lax.cond
    fn(jnp.zeros((2, 8, 8, 4)), jax.random.key(0))  # new shape: one more trace
    assert len(traces) == 2 * once


def test_img2img_start_follows_diffusers_rule():
    """t_start = steps - min(int(steps * strength), steps); the start latent is add_noise at that step's sigma."""
    sched = NoiseSchedule()
    x0, noise = np.full((1, 2, 2, 4), 0.5, np.float32), np.ones((1, 2, 2, 4), np.float32)
    for steps, strength, want in ((10, 0.6, 4), (10, 1.0, 0), (7, 0.5, 4)):
        grid = sampler_grid("euler", sched, steps)
        start, x_start = start_from(grid, strength, x0, noise)
        assert start == want
        np.testing.assert_array_equal(x_start, x0 + grid.sigmas[want] * noise)
    start, x_start = start_from(sampler_grid("euler", sched, 10), 0.0, x0, noise)
    assert start == 10 and x_start is x0  # strength 0: nothing to do
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\], got 1.5"):
        start_from(sampler_grid("euler", sched, 10), 1.5, x0, noise)


def test_lms_coefficients_are_lagrange_integrals():
    sig = jnp.asarray([14.0, 8.0, 4.5, 2.0, 0.9, 0.0])
    c = np.asarray(lms_coefficients(sig))
    # First step: order 1, the integral of 1 over the step.
    np.testing.assert_allclose(c[0], [-6.0, 0, 0, 0], rtol=1e-6)
    # Order 2 at step 1: the basis of sigma 14 through (8, 14) is (s - 8) / 6; its integral from 8 to 4.5.
    np.testing.assert_allclose(c[1, 1], 3.5**2 / 12, rtol=1e-5)
    np.testing.assert_allclose(c[1, :2].sum(), 4.5 - 8.0, rtol=1e-5)


# -- parity against diffusers' PyTorch schedulers (same deterministic model outputs, same injected noise) --

DIFFUSERS_EXTRA = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    "dpmpp_2m_karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    "pndm": {"skip_prk_steps": True},
}


def run_diffusers(name, cfg, steps, noise, noises=None, strength=None, x0=None, eta=0.0, sched=None):
    """diffusers' own denoising loop (as its pipelines run it) on NCHW numpy arrays.

    ``sched``: an already built scheduler (``set_timesteps`` done); else ``name``'s class from ``cfg``.
    """
    import diffusers
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_mod
    import diffusers.schedulers.scheduling_lcm as lcm_mod
    import torch

    if sched is None:
        cls = getattr(diffusers, SAMPLERS[name].diffusers_class)
        sched = cls.from_config({**cfg, **DIFFUSERS_EXTRA.get(name, {})})
        sched.set_timesteps(steps)
    timesteps = sched.timesteps
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    if strength is not None:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
    current = {}
    mods = (ea_mod, ddpm_mod, lcm_mod)
    origs = [m.randn_tensor for m in mods]
    for m in mods:  # the schedulers that take no variance_noise draw through randn_tensor: feed ours
        m.randn_tensor = lambda shape, **kw: current["noise"]
    try:
        for j, t in enumerate(timesteps):
            if noises is not None:
                current["noise"] = torch.from_numpy(noises[min(j, len(noises) - 1)])
            inp = sched.scale_model_input(x, t)
            out = torch.from_numpy(fake_model_np(inp.numpy(), float(t)).astype(np.float32))
            kw = {}
            if name.startswith("dpmpp_2m_sde"):
                kw = {"variance_noise": current["noise"]}
            if name == "ddim":
                kw = {"eta": eta, "variance_noise": current.get("noise")}
            x = sched.step(out, t, x, **kw).prev_sample
    finally:
        for m, o in zip(mods, origs):
            m.randn_tensor = o
    return x.numpy()


def nchw(a):
    return np.ascontiguousarray(np.transpose(np.asarray(a), (0, 3, 1, 2)))


def run_ours(name, cfg, steps, noise, noises=None, strength=None, x0=None, **opts):
    """:func:`run` under jit, on NHWC arrays; noise/noises/x0 given NCHW as for diffusers."""
    sched = NoiseSchedule.from_diffusers_config(cfg)
    grid = sampler_grid(name, sched, steps)
    nhwc = lambda a: None if a is None else jnp.asarray(np.moveaxis(a, -3, -1))  # noqa: E731
    fn = jax.jit(lambda n, z, x0: run(name, sched, grid, n, noises=z, strength=strength, x0=x0, **opts))
    return nchw(fn(nhwc(noise), nhwc(noises), nhwc(x0)))


def compare(label, ours, ref, tol=1e-5, scale=None):
    """Max abs err <= tol * scale; scale is the trajectory's, by default max(1, |result|) as assert_close."""
    err = float(np.abs(ours - ref).max())
    scale = max(1.0, float(np.abs(ref).max())) if scale is None else scale
    print(f"{label}: max abs err {err:.2e} (scale {scale:.2f})")
    assert err <= tol * scale, (err, scale)


def inputs(steps, seed=2):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    return noise, rng.standard_normal((steps, 1, 4, 8, 8)).astype(np.float32)


@pytest.mark.live
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampler_matches_diffusers(name, prediction_type):
    cfg = dict(SD15, prediction_type=prediction_type, timestep_spacing="leading")
    noise, noises = inputs(10)
    ref = run_diffusers(name, cfg, 10, noise, noises)
    compare(f"{name} ({prediction_type})", run_ours(name, cfg, 10, noise, noises), ref)


@pytest.mark.live
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers(prediction_type):
    cfg = dict(SD15, prediction_type=prediction_type)
    noise, noises = inputs(10, seed=7)
    ref = run_diffusers("ddim", cfg, 10, noise, noises, eta=0.7)
    compare(f"ddim eta=0.7 ({prediction_type})", run_ours("ddim", cfg, 10, noise, noises, eta=0.7), ref)


SPACING_CASES = {
    "linspace": dict(timestep_spacing="linspace"),
    "trailing": dict(timestep_spacing="trailing", steps_offset=0),
    # (explicit spacing: EulerDiscrete/DPMSolver default to "linspace", DDIM to "leading")
    "cosine": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="leading"),
    "zero_snr": dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


@pytest.mark.live
@pytest.mark.parametrize("case", sorted(SPACING_CASES))
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m", "euler", "euler_a", "pndm", "unipc"])
def test_schedules_and_spacings_match_diffusers(name, case):
    cfg = dict(SD15, **SPACING_CASES[case])
    steps = 7  # 1000 / 7 is not an integer: DDIM/PNDM's t - T // steps is off the trailing/linspace grid
    noise, noises = inputs(steps, seed=4)
    if case == "zero_snr" and name == "pndm":
        with pytest.raises(UnsupportedArchitectureError, match="rescale_betas_zero_snr"):
            run_ours(name, cfg, steps, noise, noises)
        pytest.skip("PNDMScheduler has no rescale_betas_zero_snr (diffusers ignores the key); we raise instead")
    ref = run_diffusers(name, cfg, steps, noise, noises)
    ours = run_ours(name, cfg, steps, noise, noises)
    scale = None
    if case == "zero_snr" and name in ("euler", "ddim", "ddpm"):
        # alpha_bar_T = 0 makes sigma_T infinite; like diffusers' Euler/DPM/UniPC we clamp it to 2^-24 (sigma 4096).
        # Euler-type schedulers then start at x = 4096 * noise and cancel it in the first step: fp32 rounding of
        # that trajectory (in diffusers as in ours) is ~4096 * 6e-8, so its scale is |x_T|.
        scale = float(np.abs(noise).max()) * 4096.0
        if name in ("ddim", "ddpm"):
            # DDIMScheduler/DDPMScheduler keep alpha_bar_T = 0 exactly, which our VE space cannot hold: x0 at
            # step 0 differs by sqrt(2^-24) * x_T. KNOWN GAP: ~2e-4, not 1e-5.
            scale = 25.0 * max(1.0, float(np.abs(ref).max()))
    compare(f"{name} {case}", ours, ref, scale=scale)


@pytest.mark.live
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "euler_a", "heun", "lms"])
def test_img2img_matches_diffusers(name):
    cfg = dict(SD15, timestep_spacing="leading")
    noise, noises = inputs(10, seed=5)
    x0 = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)
    start, _ = start_from(sampler_grid(name, NoiseSchedule.from_diffusers_config(cfg), 10), 0.6, x0, noise)
    ref = run_diffusers(name, cfg, 10, noise, noises[start:], strength=0.6, x0=x0)
    ours = run_ours(name, cfg, 10, noise, noises, strength=0.6, x0=x0)
    compare(f"{name} img2img strength 0.6", ours, ref)
