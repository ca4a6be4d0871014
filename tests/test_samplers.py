"""Sampler trajectories against diffusers' PyTorch schedulers, on a fixed fake model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.sampling.denoiser import make_denoiser
from sd_jax.sampling.samplers import sample_euler, sample_euler_ancestral
from sd_jax.schedules import NoiseSchedule, discrete_sigmas, karras_sigmas, sigma_to_t

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
    sigmas, _ = discrete_sigmas(sched, 12)
    init = noise * (np.sqrt(sigmas[0] ** 2 + 1) if spacing == "leading" else sigmas[0])
    ours = jax.jit(lambda x0: sample_euler(make_denoiser(fake_model_jax, sched, None), x0, jnp.asarray(sigmas)))
    out = np.asarray(ours(jnp.asarray(init)))
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
    sigmas, _ = discrete_sigmas(sched, 10, final="sigma_min")
    x0 = noise * np.sqrt(sigmas[0] ** 2 + 1)
    out = sample_euler(make_denoiser(fake_model_jax, sched, None), jnp.asarray(x0), jnp.asarray(sigmas))
    out = np.asarray(out) / np.sqrt(sigmas[-1] ** 2 + 1)  # back to the VP latent
    assert_close(out, x.numpy())


def test_euler_ancestral_is_deterministic_per_key():
    sched = NoiseSchedule()
    sigmas, _ = discrete_sigmas(sched, 6)
    d = make_denoiser(fake_model_jax, sched, None)
    x = jnp.ones((1, 4, 4, 4)) * sigmas[0]
    a = sample_euler_ancestral(d, x, jnp.asarray(sigmas), jax.random.key(0))
    b = sample_euler_ancestral(d, x, jnp.asarray(sigmas), jax.random.key(0))
    c = sample_euler_ancestral(d, x, jnp.asarray(sigmas), jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 1e-3


# -- every sampler against its diffusers scheduler, through the same entry point the pipelines use --

DIFFUSERS_CLASS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "ddpm": ("DDPMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def run_diffusers(name, cfg, steps, noise, step_noises, strength=None, x0=None):
    import diffusers
    import torch

    cls_name, extra = DIFFUSERS_CLASS["ddim" if name == "ddim_eta" else name]
    cls = getattr(diffusers, cls_name)
    sched = cls.from_config({**cfg, **extra})
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    if strength is not None:
        init = min(int(steps * strength), steps)
        t_start = max(steps - init, 0)
        timesteps = timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
    calls = iter(step_noises)
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    mods = (ea, ddpm_mod, lcm_mod)
    origs = [m.randn_tensor for m in mods]
    for m in mods:
        m.randn_tensor = lambda shape, **kw: torch.from_numpy(next(calls))
    try:
        for t in timesteps:
            inp = sched.scale_model_input(x, t)
            out = torch.from_numpy(fake_model_np(inp.numpy(), float(t)).astype(np.float32))
            kw = {"variance_noise": torch.from_numpy(next(calls))} if name == "dpmpp_2m_sde" else {}
            if name == "ddim_eta":
                kw = {"eta": 0.7, "variance_noise": torch.from_numpy(next(calls))}
            x = sched.step(out, t, x, **kw).prev_sample
    finally:
        for m, o in zip(mods, origs):
            m.randn_tensor = o
    return x.numpy()


def run_ours(name, cfg, steps, noise, key, strength=None, x0=None):
    from sd_jax.sampling import samplers
    from sd_jax.sampling.grids import init_noise_sigma, sampler_grid
    from sd_jax.sampling.samplers import sample

    if name == "ddim_eta":
        samplers.SAMPLERS["ddim_eta"] = lambda d, s, t, k: samplers.ddim(d, s, t, k, eta=0.7)
    sched = NoiseSchedule.from_diffusers_config(cfg)
    grid_name = "ddim" if name == "ddim_eta" else name
    sigmas, ts = sampler_grid(grid_name, sched, steps)
    start, x_start = 0, None
    if strength is not None:
        start = steps - min(int(steps * strength), steps)
        x_start = jnp.asarray(x0) + sigmas[start] * jnp.asarray(noise)
    fn = jax.jit(
        lambda n, k: sample(
            name, make_denoiser(fake_model_jax, sched, None), n, jnp.asarray(sigmas), jnp.asarray(ts), k,
            init_sigma=init_noise_sigma(grid_name, sched, sigmas), start=start, x_start=x_start,
        )[0]
    )  # fmt: skip
    return np.asarray(fn(jnp.asarray(noise), key))


def step_noises(key, steps, shape):
    return [np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape)) for i in range(steps)]


@pytest.mark.live
@pytest.mark.parametrize("name", sorted(DIFFUSERS_CLASS) + ["ddim_eta"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampler_matches_diffusers(name, prediction_type):
    cfg = dict(SD15, prediction_type=prediction_type, timestep_spacing="leading")
    steps, key = 10, jax.random.key(3)
    noise = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = run_diffusers(name, cfg, steps, noise, step_noises(key, steps, noise.shape))
    ours = run_ours(name, cfg, steps, noise, key)
    err = float(np.abs(ours - ref).max())
    print(f"{name} ({prediction_type}): max abs err {err:.2e}")
    assert_close(ours, ref)


@pytest.mark.live
@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_sampler_spacings_and_zero_snr(name, spacing):
    cfg = dict(SD15, timestep_spacing=spacing)
    if spacing == "trailing":
        cfg.update(rescale_betas_zero_snr=True, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    steps = 8
    noise = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    if name == "ddim" and spacing != "leading":
        pytest.skip("DDIM steps to t - n//steps, not to the next grid timestep, off the default 'leading' spacing")
    ref = run_diffusers(name, cfg, steps, noise, [])
    ours = run_ours(name, cfg, steps, noise, jax.random.key(0))
    print(f"{name} {spacing}: max abs err {np.abs(ours - ref).max():.2e}")
    # Zero terminal SNR starts at sigma = 4096: x ~ 4096 * noise, and the first Euler step cancels it down to O(1),
    # so fp32 rounding alone is ~4096 * 6e-8 = 2.4e-4 there (in diffusers as in ours).
    assert_close(ours, ref, tol=3e-4 if spacing == "trailing" else 1e-5)


@pytest.mark.live
@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
def test_img2img_start_matches_diffusers(name):
    cfg = dict(SD15, timestep_spacing="leading")
    noise = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    x0 = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = run_diffusers(name, cfg, 10, noise, [], strength=0.6, x0=x0)
    ours = run_ours(name, cfg, 10, noise, jax.random.key(0), strength=0.6, x0=x0)
    print(f"{name} img2img: max abs err {np.abs(ours - ref).max():.2e}")
    assert_close(ours, ref)
