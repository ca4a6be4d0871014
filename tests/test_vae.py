"""AutoencoderKL: parity with diffusers on the fixtures, the posterior, tiling, dtypes and sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.loading.diffusers import load_component
from sd_jax.models import vae
from sd_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


def nhwc(x):
    return jnp.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("variant", ["sd1", "sdxl", "upscale"])
def test_vae_matches_diffusers(variant, fixtures_dir):
    ref = np.load(fixtures_dir / "reference" / f"{variant}.npz")
    cfg, params = load_component(fixtures_dir / variant, "vae")
    model = AutoencoderKL(cfg)
    mean, logvar = model.apply({"params": params}, nhwc(ref["vae/encode_input"]), method=AutoencoderKL.encode)
    dec = model.apply({"params": params}, nhwc(ref["vae/decode_input"]), method=AutoencoderKL.decode)
    errs = {
        "mean": np.abs(nchw(mean) - ref["vae/latent_mean"]).max(),
        "logvar": np.abs(nchw(logvar) - ref["vae/latent_logvar"]).max(),
        "decode": np.abs(nchw(dec) - ref["vae/decoded"]).max(),
    }
    print(variant, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= 1e-4


def test_scaling_factor_from_config(fixtures_dir):
    assert load_component(fixtures_dir / "sd1", "vae")[0].scaling_factor == 0.18215
    assert load_component(fixtures_dir / "sdxl", "vae")[0].scaling_factor == 0.13025


def test_scaled_latents_round_trip_the_scaling(fixtures_dir):
    cfg, params = load_component(fixtures_dir / "sd1", "vae")
    model = AutoencoderKL(cfg)
    x = jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
    z = vae.encode_latents(model, params, x)
    mean, _ = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    np.testing.assert_allclose(z, mean * 0.18215, rtol=1e-6)
    dec = vae.decode_latents(model, params, z)
    np.testing.assert_allclose(dec, model.apply({"params": params}, mean, method=AutoencoderKL.decode), atol=1e-5)


def test_diagonal_gaussian():
    post = DiagonalGaussian(jnp.zeros((2, 4, 4, 4)), jnp.zeros((2, 4, 4, 4)))
    np.testing.assert_allclose(post.kl(), 0.0)
    s = post.sample(jax.random.key(0))
    assert abs(float(s.std()) - 1.0) < 0.2 and post.mode() is post.mean
    shifted = DiagonalGaussian(jnp.ones((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_allclose(shifted.kl(), [2.0])  # 0.5 * sum(mu^2) over 4 dims


def test_full_size_parameter_count():
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vae.abstract_params(VAEConfig.sd())))
    assert n == 83_653_863


def test_bf16_close_to_fp32(fixtures_dir):
    ref = np.load(fixtures_dir / "reference" / "sd1.npz")
    cfg, params = load_component(fixtures_dir / "sd1", "vae")
    bf = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    dec = AutoencoderKL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply(
        {"params": bf}, nhwc(ref["vae/decode_input"]), method=AutoencoderKL.decode
    )
    assert dec.dtype == jnp.bfloat16
    assert np.abs(nchw(dec.astype(jnp.float32)) - ref["vae/decoded"]).max() < 0.1


def test_tiling_of_one_tile_is_plain_decode(fixtures_dir):
    cfg, params = load_component(fixtures_dir / "sd1", "vae")
    model = AutoencoderKL(cfg)
    z = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))  # smaller than one 8x8 latent tile
    plain = model.apply({"params": params}, z, method=AutoencoderKL.decode)
    np.testing.assert_allclose(vae.tiled_decode(model, params, z), plain, atol=1e-5)


@pytest.mark.live
def test_tiled_encode_decode_match_diffusers_enable_tiling(fixtures_dir):
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    theirs = TorchVAE.from_pretrained(fixtures_dir / "sd1" / "vae").eval()
    theirs.enable_tiling()
    cfg, params = load_component(fixtures_dir / "sd1", "vae")
    model = AutoencoderKL(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 80, 72, generator=g) * 2 - 1  # several 32-pixel tiles, ragged edges
    z = torch.randn(1, 4, 20, 18, generator=g)
    with torch.no_grad():
        ref_mean = theirs.encode(x).latent_dist.mean.numpy()
        ref_dec = theirs.decode(z).sample.numpy()
    mean, _ = vae.tiled_encode(model, params, nhwc(x.numpy()))
    dec = vae.tiled_decode(model, params, nhwc(z.numpy()))
    e1, e2 = np.abs(nchw(mean) - ref_mean).max(), np.abs(nchw(dec) - ref_dec).max()
    print(f"tiled encode err {e1:.2e}, tiled decode err {e2:.2e}")
    assert e1 <= 1e-4 and e2 <= 1e-4


@pytest.mark.live
def test_export_and_config_round_trip(fixtures_dir):
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from sd_jax.convert.diffusers import to_torch_state_dict

    theirs = TorchVAE.from_pretrained(fixtures_dir / "sd1" / "vae")
    cfg, params = load_component(fixtures_dir / "sd1", "vae")
    assert VAEConfig.from_diffusers_config(dict(theirs.config)) == cfg
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(params).items()}
    fresh = TorchVAE.from_config(cfg.to_diffusers_config())
    fresh.load_state_dict(state, strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
