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
    err = np.abs(nchw(dec.astype(jnp.float32)) - ref["vae/decoded"]).max()
    print(f"bf16 decode err vs fp32 diffusers {err:.2e}")
    assert err < 0.1


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
        plain_dec = theirs.decoder(theirs.post_quant_conv(z)).numpy()
    assert np.abs(ref_dec - plain_dec).max() > 1e-3  # tiling really changes the output
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


# -- configs and shapes, no torch --


@pytest.mark.parametrize("cfg", [VAEConfig.sd(), VAEConfig.sdxl(), VAEConfig.tiny(), VAEConfig.x4_upscaler()])
def test_config_round_trips_through_diffusers_dict(cfg):
    d = cfg.to_diffusers_config()
    assert d["_class_name"] == "AutoencoderKL"
    assert VAEConfig.from_diffusers_config({**d, "_diffusers_version": "0.42.1"}) == cfg


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
        ("act_fn", "gelu"),
    ],
)
def test_unsupported_config_names_key_and_value(key, value):
    from sd_jax.errors import UnsupportedArchitectureError

    d = {**VAEConfig.tiny().to_diffusers_config(), key: value}
    with pytest.raises(UnsupportedArchitectureError, match=key) as e:
        VAEConfig.from_diffusers_config(d)
    assert ("Attn" in str(e.value)) or ("gelu" in str(e.value))


def test_tiny_shapes_and_init_matches_abstract():
    cfg = VAEConfig.tiny()
    params = vae.init_params(cfg, jax.random.key(0))
    abstract = vae.abstract_params(cfg)
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == jax.tree.map(lambda p: (p.shape, p.dtype), abstract)
    assert sum(p.size for p in jax.tree.leaves(params)) < 1_000_000
    assert {"encoder", "decoder", "quant_conv", "post_quant_conv"} == set(params)
    assert set(params["encoder"]["mid_block"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}
    assert params["encoder"]["down_blocks_0"]["downsamplers_0"]["conv"]["kernel"].shape == (3, 3, 8, 8)
    k = params["decoder"]["mid_block"]["resnets_0"]["conv1"]["kernel"]  # lecun normal: std 1/sqrt(fan_in)
    assert abs(float(k.std()) * np.sqrt(3 * 3 * 16) - 1.0) < 0.05
    assert float(jnp.abs(params["decoder"]["conv_in"]["bias"]).max()) == 0.0
    model = AutoencoderKL(cfg)
    shapes = {
        m: jax.eval_shape(lambda x, m=m: model.apply({"params": params}, x, method=m), jnp.zeros(s))
        for m, s in ((AutoencoderKL.encode, (2, 16, 24, 3)), (AutoencoderKL.decode, (2, 4, 6, 4)))
    }
    mean, logvar = shapes[AutoencoderKL.encode]
    assert mean.shape == logvar.shape == (2, 4, 6, 4)
    assert shapes[AutoencoderKL.decode].shape == (2, 16, 24, 3)
    bf = vae.abstract_params(cfg, param_dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(bf)} == {jnp.dtype(jnp.bfloat16)}


# -- live: a tiny diffusers AutoencoderKL built here, norms perturbed so they are not identity --

LIVE_VARIANTS = {
    "default": {},
    "bare": dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.1),
}


def _torch_vae(overrides):
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    cfg = VAEConfig.tiny(block_out_channels=(16, 32), norm_num_groups=8, **overrides)
    torch.manual_seed(0)
    theirs = TorchVAE.from_config(cfg.to_diffusers_config()).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return cfg, theirs


def _load(theirs, cfg):
    from sd_jax.convert.diffusers import load_torch_state_dict

    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    return load_torch_state_dict(state, vae.abstract_params(cfg), source="tiny torch VAE")


@pytest.mark.live
@pytest.mark.parametrize("variant", LIVE_VARIANTS)
def test_live_parity_with_fresh_diffusers_vae(variant):
    import torch

    from sd_jax.convert.diffusers import to_torch_state_dict

    cfg, theirs = _torch_vae(LIVE_VARIANTS[variant])
    assert VAEConfig.from_diffusers_config(dict(theirs.config)) == cfg
    params = _load(theirs, cfg)
    model = AutoencoderKL(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        post = theirs.encode(x).latent_dist
        ref_dec = theirs.decode(z).sample.numpy()
    mean, logvar = model.apply({"params": params}, nhwc(x.numpy()), method=AutoencoderKL.encode)
    dec = model.apply({"params": params}, nhwc(z.numpy()), method=AutoencoderKL.decode)
    errs = {
        "mean": np.abs(nchw(mean) - post.mean.numpy()).max(),
        "logvar": np.abs(nchw(logvar) - post.logvar.numpy()).max(),
        "decode": np.abs(nchw(dec) - ref_dec).max(),
    }
    print(variant, {k: f"{v:.2e}" for k, v in errs.items()}, f"|decode| max {np.abs(ref_dec).max():.2f}")
    assert max(errs.values()) <= 1e-4
    # pipeline convention: latents = (z - shift) * scaling, and back
    lat = vae.encode_latents(model, params, nhwc(x.numpy()))
    shift = cfg.shift_factor or 0.0
    np.testing.assert_allclose(nchw(lat), (post.mean.numpy() - shift) * cfg.scaling_factor, atol=1e-5)
    back = vae.decode_latents(model, params, (nhwc(z.numpy()) - shift) * cfg.scaling_factor)
    assert np.abs(nchw(back) - ref_dec).max() <= 1e-4
    # export: our params load strictly into a fresh diffusers model, bit for bit
    fresh = type(theirs).from_config(cfg.to_diffusers_config())
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(params).items()})
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
