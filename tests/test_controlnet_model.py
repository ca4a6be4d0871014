"""ControlNetModel against diffusers' residuals (tools/make_controlnet_fixtures.py), loading and from_unet."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.errors import ShapeMismatchError
from sd_jax.loading.diffusers import load_component
from sd_jax.models.controlnet import ControlNetConfig, ControlNetModel, from_unet
from sd_jax.models.unet import UNet2DConditionModel

FIX = __import__("pathlib").Path(__file__).parent / "fixtures"
REF = np.load(FIX / "reference" / "controlnet.npz")
BASE = {"sd1": "sd1", "sd1_b": "sd1", "sdxl": "sdxl"}
CASES = {"plain": {}, "scaled": {"conditioning_scale": 0.6}, "guess": {"guess_mode": True, "conditioning_scale": 0.8}}


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def run(name, **kw):
    config, params = load_component(FIX / "controlnet" / name)
    r = {k.split("/", 1)[1]: REF[k] for k in REF.files if k.startswith(f"{name}/") and k.count("/") == 1}
    extra = {k: jnp.asarray(r[k]) for k in ("text_embeds", "time_ids") if k in r}
    out = ControlNetModel(config).apply(
        {"params": params}, nhwc(r["sample"]), jnp.asarray(r["timestep"]), jnp.asarray(r["context"]),
        nhwc(r["cond"]), **kw, **extra,
    )  # fmt: skip
    return config, params, r, extra, out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", BASE)
def test_residuals_match_diffusers(name, case):
    _, _, _, _, (down, mid) = run(name, **CASES[case])
    n = len([k for k in REF.files if k.startswith(f"{name}/{case}/down_")])
    assert len(down) == n
    worst = 0.0
    for i, d in enumerate(down):
        want = REF[f"{name}/{case}/down_{i}"]
        assert np.abs(want).max() > 1e-2  # the perturbed zero convs produce real signal
        worst = max(worst, float(np.abs(np.asarray(d) - want.transpose(0, 2, 3, 1)).max()))
    worst = max(worst, float(np.abs(np.asarray(mid) - REF[f"{name}/{case}/mid"].transpose(0, 2, 3, 1)).max()))
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_with_residuals_matches_diffusers(name):
    _, _, r, extra, (down, mid) = run(name)
    ucfg, uparams = load_component(FIX / BASE[name] / "unet")
    eps = UNet2DConditionModel(ucfg).apply(
        {"params": uparams}, nhwc(r["sample"]), jnp.asarray(r["timestep"]), jnp.asarray(r["context"]),
        down_block_additional_residuals=down, mid_block_additional_residual=mid, **extra,
    )  # fmt: skip
    want = REF[f"{name}/unet_eps"].transpose(0, 2, 3, 1)
    plain = UNet2DConditionModel(ucfg).apply(
        {"params": uparams}, nhwc(r["sample"]), jnp.asarray(r["timestep"]), jnp.asarray(r["context"]), **extra
    )
    assert np.abs(np.asarray(eps) - want).max() <= 1e-4
    assert np.abs(np.asarray(plain) - want).max() > 1e-2  # the residuals matter


def test_config_round_trips_through_diffusers_json():
    raw = json.loads((FIX / "controlnet" / "sdxl" / "config.json").read_text())
    config = ControlNetConfig.from_diffusers_config(raw)
    assert config.unet.addition_embed_type == "text_time"
    assert config.conditioning_embedding_out_channels == (8, 16, 16)
    again = config.to_diffusers_config()
    assert ControlNetConfig.from_diffusers_config(again) == config
    for key in ("layers_per_block", "cross_attention_dim", "projection_class_embeddings_input_dim"):
        assert again[key] == raw[key], key


def test_from_unet_copies_the_encoder_and_zeroes_the_outputs():
    ucfg, uparams = load_component(FIX / "sd1" / "unet")
    config, params = from_unet(ucfg, uparams, jax.random.key(0), conditioning_embedding_out_channels=(8, 16, 16))
    for k in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
        for a, b in zip(jax.tree.leaves(params[k]), jax.tree.leaves(uparams[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    zero = [k for k in params if k.startswith("controlnet_")]
    assert len(zero) == config.num_residuals + 2  # per skip, mid, and the hint encoder
    assert all(not np.any(np.asarray(x)) for k in zero if k != "controlnet_cond_embedding" for x in
               jax.tree.leaves(params[k]))  # fmt: skip
    assert not np.any(np.asarray(params["controlnet_cond_embedding"]["conv_out"]["kernel"]))
    r = {k.split("/", 1)[1]: REF[k] for k in REF.files if k.startswith("sd1/") and k.count("/") == 1}
    down, mid = ControlNetModel(config).apply(
        {"params": params}, nhwc(r["sample"]), r["timestep"], r["context"], nhwc(r["cond"])
    )
    assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))


def test_a_controlnet_for_another_base_is_refused(tmp_path):
    import shutil

    shutil.copytree(FIX / "controlnet" / "sd1", tmp_path / "cn")
    cfg = json.loads((tmp_path / "cn" / "config.json").read_text())
    cfg["cross_attention_dim"] = 64
    (tmp_path / "cn" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match="attn2.to_k.weight"):
        load_component(tmp_path / "cn")
