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
