"""Loading ControlNets as users have them: single files (original layout or diffusers names), export, bad input.

Fixtures: tests/fixtures/controlnet/single_file (tools/make_controlnet_single_file_fixtures.py; diffusers'
``ControlNetModel.from_single_file`` reads those files to the folders' tensors).
"""

import pathlib

import jax
import numpy as np
import pytest

from sd_jax.errors import (
    MissingParameterError,
    ShapeMismatchError,
    UnexpectedKeyError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from sd_jax.loading.controlnet import check_base, load_controlnet, save_controlnet, save_controlnet_single_file
from sd_jax.loading.diffusers import read_component_config
from sd_jax.loading.safetensors_io import read_safetensors, write_safetensors

FIX = pathlib.Path(__file__).parent / "fixtures"
SF = FIX / "controlnet" / "single_file"


def same(a, b):
    ka, kb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert ka == kb
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("file", ["sd1", "sd1_noprefix", "sdxl", "sdxl_noprefix"])
def test_single_file_equals_folder(file):
    base = file.split("_")[0]
    want_cfg, want = load_controlnet(SF / base)
    cfg, params = load_controlnet(SF / f"{file}.safetensors", config=SF / base)
    assert cfg == want_cfg
    same(params, want)  # the fp16 file holds exactly the folder's (fp16-representable) values, loaded as fp32
    cfg2, _ = load_controlnet(SF / f"{file}.safetensors", config=SF / base / "config.json")
    assert cfg2 == want_cfg


def test_diffusers_named_single_file(tmp_path):
    write_safetensors(tmp_path / "cn.safetensors", read_safetensors(SF / "sd1" / "diffusion_pytorch_model.safetensors"))
    _, want = load_controlnet(SF / "sd1")
    _, got = load_controlnet(tmp_path / "cn.safetensors", config=SF / "sd1")
    same(got, want)


def test_whole_controlnet_1_0_file_skips_the_base_model(tmp_path):
    """ControlNet 1.0 files carry the whole SD model beside ``control_model.*``; diffusers skips it, so do we."""
    state = dict(read_safetensors(SF / "sd1.safetensors"))
    state["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 4, 3, 3), np.float16)
    state["first_stage_model.encoder.conv_in.bias"] = np.zeros(4, np.float16)
    state["betas"] = np.zeros(10, np.float32)
    write_safetensors(tmp_path / "full.safetensors", state)
    _, got = load_controlnet(tmp_path / "full.safetensors", config=SF / "sd1")
    same(got, load_controlnet(SF / "sd1")[1])


def test_tiny_file_without_config_names_what_to_pass():
    with pytest.raises(UnsupportedArchitectureError, match="pass config="):
        load_controlnet(SF / "sd1.safetensors")


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_export_round_trips(tmp_path, prefix):
    cfg, params = load_controlnet(FIX / "controlnet" / "sd1")  # 3 hint levels: the formula, not just index 14
    save_controlnet(tmp_path / "folder", cfg, params)
    cfg2, params2 = load_controlnet(tmp_path / "folder")
    assert cfg2 == cfg
    same(params2, params)
    path = save_controlnet_single_file(tmp_path / "cn.safetensors", cfg, params, prefix=prefix)
    keys = set(read_safetensors(path))
    assert f"{prefix}input_hint_block.10.weight" in keys and f"{prefix}middle_block_out.0.bias" in keys
    assert all(k.startswith(prefix) for k in keys)
    cfg3, params3 = load_controlnet(path, config=cfg)
    same(params3, params)


def test_export_fp16_single_file(tmp_path):
    cfg, params = load_controlnet(SF / "sdxl")
    path = save_controlnet_single_file(tmp_path / "cn.safetensors", cfg, params, dtype=np.float16)
    assert {v.dtype for v in read_safetensors(path).values()} == {np.dtype(np.float16)}
    assert read_safetensors(path)["control_model.label_emb.0.0.weight"].shape == (
        64,
        80,
    )  # (time width, 80 = text + time ids)
    same(load_controlnet(path, config=cfg)[1], params)


def test_export_refuses_a_file_where_a_folder_goes(tmp_path):
    cfg, params = load_controlnet(SF / "sd1")
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        save_controlnet(tmp_path / "x", cfg, params)


def test_controlnet_for_another_base_is_refused():
    cfg, _ = load_controlnet(SF / "sdxl")
    _, _, unet = read_component_config(FIX / "sd1" / "unet")
    with pytest.raises(UnsupportedArchitectureError, match="cross_attention_dim=64 but the model's U-Net has 32"):
        check_base(cfg, unet, "cn.safetensors")
    check_base(load_controlnet(SF / "sd1")[0], unet, "ok")


def test_wrong_config_for_the_file_is_an_error():
    with pytest.raises(UnexpectedKeyError, match=r"control_model\.input_blocks\.3\.1\.norm\.bias"):
        load_controlnet(SF / "sdxl.safetensors", config=SF / "sd1")


def _edited(tmp_path, edit):
    state = dict(read_safetensors(SF / "sd1.safetensors"))
    edit(state)
    write_safetensors(tmp_path / "bad.safetensors", state)
    return tmp_path / "bad.safetensors"


def test_unknown_key_is_named(tmp_path):
    path = _edited(tmp_path, lambda s: s.update({"control_model.zero_convs.99.0.weight": np.zeros(1, np.float16)}))
    with pytest.raises(UnexpectedKeyError, match=r"zero_convs\.99\.0\.weight"):
        load_controlnet(path, config=SF / "sd1")


def test_stray_prefix_is_named(tmp_path):
    path = _edited(tmp_path, lambda s: s.update({"lora_unet.foo": np.zeros(1, np.float16)}))
    with pytest.raises(UnexpectedKeyError, match="lora_unet.foo"):
        load_controlnet(path, config=SF / "sd1")


def test_missing_key_is_named(tmp_path):
    path = _edited(tmp_path, lambda s: s.pop("control_model.middle_block_out.0.weight"))
    with pytest.raises(MissingParameterError, match=r"middle_block_out\.0\.weight \(diffusers controlnet_mid_block"):
        load_controlnet(path, config=SF / "sd1")


def test_wrong_shape_is_named(tmp_path):
    def edit(s):
        s["control_model.input_hint_block.14.weight"] = np.zeros((16, 8, 3, 3), np.float16)

    with pytest.raises(
        ShapeMismatchError,
        match=r"control_model\.input_hint_block\.14\.weight: file \(16, 8, 3, 3\), this config needs \(16, 16, 3, 3\)",
    ):
        load_controlnet(_edited(tmp_path, edit), config=SF / "sd1")


def test_pickle_is_refused_without_allow_pickle(tmp_path):
    for name in ("control_v11p_sd15_canny.pth", "cn.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04not really")
        with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
            load_controlnet(tmp_path / name)


def test_not_a_checkpoint_file(tmp_path):
    (tmp_path / "cn.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a ControlNet file"):
        load_controlnet(tmp_path / "cn.txt")


@pytest.mark.live
def test_diffusers_loads_our_folder_export(tmp_path):
    import torch
    from diffusers import ControlNetModel

    cfg, params = load_controlnet(FIX / "controlnet" / "sdxl")
    save_controlnet(tmp_path / "cn", cfg, params)
    want = ControlNetModel.from_pretrained(FIX / "controlnet" / "sdxl").state_dict()
    got = ControlNetModel.from_pretrained(tmp_path / "cn").state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
