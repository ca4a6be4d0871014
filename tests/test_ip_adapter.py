"""IP-Adapter / IP-Adapter Plus against diffusers' load_ip_adapter + set_ip_adapter_scale on the tiny sd1 fixture.

References come from ``tools/make_ip_fixtures.py`` (``tests/fixtures/reference/ip_adapter.npz``); nothing here
imports torch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from skimage import data

from sd_jax.errors import (
    MissingParameterError,
    ShapeMismatchError,
    UnexpectedKeyError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from sd_jax.loading import ip_adapter as ip_loading
from sd_jax.loading.diffusers import load_component
from sd_jax.loading.safetensors_io import read_safetensors, write_safetensors
from sd_jax.models.clip_vision import CLIPVisionModelWithProjection, preprocess
from sd_jax.models.unet import UNet2DConditionModel, _dummy_inputs
from sd_jax.pipelines import ip_adapter as IP
from sd_jax.pipelines.pipeline import StableDiffusion

PROMPT = "a photo of an astronaut riding a horse on the moon"
FILES = {"plain": "ip-adapter_sd15.safetensors", "plus": "ip-adapter-plus_sd15.safetensors"}
SCALES = {"plain": 0.6, "plus": 0.8}
TOL = 2e-3  # max abs error on [0, 1] pixels


@pytest.fixture(scope="module")
def ref():
    from conftest import FIXTURES

    return dict(np.load(FIXTURES / "reference" / "ip_adapter.npz"))


@pytest.fixture(scope="module")
def models():
    from conftest import FIXTURES

    return FIXTURES / "ip_adapter" / "models"


@pytest.fixture(scope="module")
def pipe():
    from conftest import FIXTURES

    return StableDiffusion.load(FIXTURES / "sd1")


def astronaut():
    return data.astronaut().astype(np.float32) / 255


def run(pipe, ref, **kw):
    kw = dict(negative="blurry", steps=4, guidance_scale=7.0, noise=jnp.asarray(ref["noise"]), **kw)
    if "ip_image" in kw:
        return IP.generate_with_ip(pipe, [PROMPT, PROMPT], kw.pop("ip_image"), **kw)[0]
    return pipe.txt2img([PROMPT, PROMPT], **kw)[0]


def test_image_encoder_matches_transformers(models, ref):
    cfg, params = load_component(models / "image_encoder")  # the registry knows CLIPVisionModelWithProjection
    pixels = preprocess(astronaut(), cfg.image_size)
    assert np.abs(pixels - ref["pixels"]).max() < 1e-5
    model = CLIPVisionModelWithProjection(cfg)
    for name, x in (("image", pixels), ("zeros", np.zeros_like(pixels))):
        embeds, hidden = model.apply({"params": params}, jnp.asarray(x))
        assert len(hidden) == cfg.num_hidden_layers + 1
        err = max(np.abs(embeds - ref[f"{name}_embeds"]).max(), np.abs(hidden[-2] - ref[f"{name}_hidden"]).max())
        print(f"vision encoder ({name}): max abs err {err:.2e}")
        assert err <= 1e-4


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_matches_diffusers(kind, pipe, models, ref):
    IP.load_ip_adapter(pipe, models / FILES[kind], scale=SCALES[kind])
    tokens = IP.image_embeds(pipe, astronaut())[0][0]
    assert np.abs(tokens - ref[f"{kind}_tokens"]).max() <= 1e-4
    ours = run(pipe, ref, ip_image=astronaut())
    err = float(np.abs(ours - ref[f"{kind}_images"]).max())
    print(f"IP-Adapter {kind}: max abs pixel err {err:.2e}")
    assert ours.shape == ref[f"{kind}_images"].shape and err <= TOL
    assert np.abs(ref[f"{kind}_images"] - ref["plain_pipeline"]).max() > 0.2  # the image prompt matters


def test_sdxl_plus_vit_h_matches_diffusers(models, ref):
    """h94's ``ip-adapter-plus_sdxl_vit-h`` layout: the adapter in ``sdxl_models/``, the encoder in ``models/``."""
    from conftest import FIXTURES

    sdxl = StableDiffusion.load(FIXTURES / "sdxl")
    path = models.parent / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"
    IP.load_ip_adapter(sdxl, path, image_encoder=models / "image_encoder", scale=SCALES["plus"])
    noise = jnp.asarray(ref["sdxl_noise"])
    ours, _ = IP.generate_with_ip(sdxl, [PROMPT, PROMPT], astronaut(), steps=4, guidance_scale=5.0, noise=noise)
    err = float(np.abs(ours - ref["sdxl_plus_images"]).max())
    print(f"IP-Adapter Plus SDXL: max abs pixel err {err:.2e}")
    assert err <= TOL
    with pytest.raises(ShapeMismatchError, match="cross_attention_dim is 64"):
        IP.load_ip_adapter(sdxl, models / FILES["plus"])  # an SD 1.5 adapter on SDXL


def test_scale_zero_is_the_plain_pipeline_and_scale_never_recompiles(pipe, models, ref):
    IP.unload_ip_adapter(pipe)
    plain = run(pipe, ref)
    assert np.abs(plain - ref["plain_pipeline"]).max() <= TOL
    IP.load_ip_adapter(pipe, models / FILES["plain"], scale=0.6)
    first = run(pipe, ref, ip_image=astronaut())
    (fn,) = pipe._compiled.values()
    size = fn._cache_size()
    IP.set_ip_adapter_scale(pipe, 0.0)
    zero = run(pipe, ref, ip_image=astronaut())
    assert fn._cache_size() == size
    np.testing.assert_allclose(zero, plain, atol=1e-5)
    assert np.abs(first - zero).max() > 0.2


def test_two_adapters_index_their_own_weights(pipe, models, ref):
    """Plain + Plus at scales (0.6, 0): the Plus adapter adds nothing, so diffusers' plain image comes out."""
    IP.load_ip_adapter(pipe, [models / FILES["plain"], models / FILES["plus"]], scale=[0.6, 0.0])
    flat = traverse_util.flatten_dict(pipe.params["unet"])
    assert sum("to_k_ip_1" in p for p in flat) == 4 and sum("to_k_ip_0" in p for p in flat) == 4
    ours = run(pipe, ref, ip_image=[astronaut(), astronaut()])
    assert np.abs(ours - ref["plain_images"]).max() <= TOL
    with pytest.raises(ValueError, match="2 loaded adapters"):
        IP.image_embeds(pipe, [astronaut()])
    with pytest.raises(ValueError, match="3 scales for 2"):
        IP.set_ip_adapter_scale(pipe, [1.0, 1.0, 1.0])


def test_plain_unet_param_tree_is_unchanged(pipe, models):
    cfg = pipe.unet.config
    args, extra = _dummy_inputs(cfg)
    model = UNet2DConditionModel(cfg)
    plain = traverse_util.flatten_dict(jax.eval_shape(lambda k: model.init(k, *args, **extra), jax.random.key(0)))
    assert not any("processor" in p for p in plain)
    ip = ((jnp.zeros((1, 4, cfg.cross_attention_dim)), 1.0),)
    init = lambda k: model.init(k, *args, **extra, ip_hidden_states=ip)  # noqa: E731
    with_ip = traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0)))
    assert set(with_ip) - set(plain) == {p for p in with_ip if "processor" in p} and set(plain) <= set(with_ip)
    IP.load_ip_adapter(pipe, models / FILES["plain"])
    IP.unload_ip_adapter(pipe)
    assert set(traverse_util.flatten_dict(pipe.params["unet"])) == {p[1:] for p in plain}


def _write(tmp_path, state, name="bad.safetensors"):
    path = tmp_path / name
    write_safetensors(path, {k: np.ascontiguousarray(v) for k, v in state.items()})
    return path


def test_bad_files_fail_in_one_line(tmp_path, pipe, models):
    unet_cfg = pipe.unet.config
    enc_cfg, _ = load_component(models / "image_encoder")
    good = read_safetensors(models / FILES["plain"])

    def error(exc, state, enc=enc_cfg, name="bad.safetensors"):
        path = _write(tmp_path, state, name)
        with pytest.raises(exc) as info:
            ip_loading.load(path, unet_cfg, enc)
        msg = str(info.value)
        assert str(path) in msg
        return msg

    # an adapter for a wider cross-attention (another base model)
    wide = dict(good, **{"image_proj.proj.weight": np.zeros((4 * 48, 24), np.float32)})
    msg = error(ShapeMismatchError, wide)
    assert "\n" not in msg and "image_proj.proj.weight" in msg and "(192, 24)" in msg and "32" in msg
    # an image encoder whose projection does not match
    msg = error(ShapeMismatchError, good, enc=dataclasses.replace(enc_cfg, projection_dim=12))
    assert "\n" not in msg and "projection_dim is 12" in msg and "(128, 24)" in msg
    # a U-Net weight of the wrong width
    odd = dict(good, **{"ip_adapter.3.to_k_ip.weight": np.zeros((16, 40), np.float32)})
    msg = error(ShapeMismatchError, odd)
    assert "\n" not in msg and "ip_adapter.3.to_k_ip.weight" in msg and "(16, 40)" in msg
    # strict: a missing and an extra layer
    missing = {k: v for k, v in good.items() if k != "ip_adapter.7.to_v_ip.weight"}
    assert "ip_adapter_7/to_v_ip" in error(MissingParameterError, missing)
    extra = dict(good, **{"ip_adapter.9.to_k_ip.weight": np.zeros((16, 32), np.float32)})
    assert "ip_adapter.9.to_k_ip.weight" in error(UnexpectedKeyError, extra)
    # IP-Adapter FaceID is not supported
    faceid = {"image_proj.proj.0.weight": np.zeros((8, 4)), "image_proj.norm.weight": np.zeros(32)}
    assert "FaceID" in error(
        UnsupportedArchitectureError, {**faceid, "ip_adapter.1.to_k_ip.weight": np.zeros((16, 32))}
    )
    # a pickle is refused unless allowed
    (tmp_path / "ip.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UnsafeCheckpointError):
        ip_loading.load(tmp_path / "ip.bin", unet_cfg, enc_cfg)


def test_bad_images_and_no_adapter(pipe, models):
    IP.unload_ip_adapter(pipe)
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        IP.set_ip_adapter_scale(pipe, 0.5)
    IP.load_ip_adapter(pipe, models / FILES["plain"])
    with pytest.raises(ValueError, match="floats in \\[0, 1\\]"):
        IP.image_embeds(pipe, data.astronaut().astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        IP.image_embeds(pipe, np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="weight_name"):
        IP.load_ip_adapter(pipe, models)
