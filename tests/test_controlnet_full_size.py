"""Full-size ControlNets: diffusers' keys and lllyasviel's original single-file keys, one to one, no weights.

Ours come from ``jax.eval_shape``; diffusers' ``ControlNetModel`` from torch's meta device (live tests);
an original-layout "file" from zero-stride numpy views (``np.broadcast_to``), so nothing is allocated.
The shipped configs (sd_jax/model_configs/controlnet_*) are diffusers' ``ControlNetModel.from_unet`` of the
shipped U-Net configs (tools/make_controlnet_single_file_fixtures.py): SD 1.5 = lllyasviel/control_v11p_sd15_*,
SDXL = diffusers/controlnet-canny-sdxl-1.0.
"""

import dataclasses
import functools
import importlib.resources
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from sd_jax.convert import controlnet_single_file as cnsf
from sd_jax.convert.diffusers import flax_path_to_torch_key, match_torch_key
from sd_jax.loading.controlnet import _check_shapes, shipped_config
from sd_jax.models.controlnet import abstract_params

CONFIGS = importlib.resources.files("sd_jax") / "model_configs"
# sum(p.numel() for p in ControlNetModel.from_config(config.json).parameters()) on torch's meta device
# (torch 2.13, diffusers 0.42.1); test_every_diffusers_parameter_maps_one_to_one recomputes them.
EXPECTED = {"controlnet_sd15": 361_279_120, "controlnet_sd21": 364_228_240, "controlnet_sdxl": 1_251_014_160}
# diffusers' bare ``ControlNetModel()``: the SD 1.5 layout but cross_attention_dim=1280 (its default), so attn2's
# to_k/to_v are 512 wider in 7 transformers: + 2 * 512 * (2*320 + 2*640 + 2*1280 + 1280) = 5,898,240.
DIFFUSERS_DEFAULT = 367_177_360
# Keys and shapes of the real original files (control_v11p_sd15_canny.pth, thibaud controlnet-sd21, SDXL cldm).
REAL = {
    "controlnet_sd15": {
        "input_hint_block.0.weight": (16, 3, 3, 3),
        "input_hint_block.14.weight": (320, 256, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "zero_convs.11.0.weight": (1280, 1280, 1, 1),
        "middle_block_out.0.weight": (1280, 1280, 1, 1),
        "time_embed.0.weight": (1280, 320),
    },
    "controlnet_sd21": {"input_blocks.1.1.proj_in.weight": (320, 320), "zero_convs.11.0.bias": (1280,)},
    "controlnet_sdxl": {
        "label_emb.0.0.weight": (1280, 2816),
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "zero_convs.8.0.weight": (1280, 1280, 1, 1),
        "input_hint_block.14.weight": (320, 256, 3, 3),
    },
}
N_TENSORS = {"controlnet_sd15": 340, "controlnet_sd21": 340, "controlnet_sdxl": 844}


@functools.lru_cache
def shapes_of(name):
    """Our parameter tree of a shipped config, shapes only (``jax.eval_shape``)."""
    return abstract_params(shipped_config(name))


def torch_shapes(config, params=None) -> dict[str, tuple[int, ...]]:
    """Our abstract params as diffusers state-dict keys and PyTorch shapes (OIHW convs, (out, in) Linears)."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(params or abstract_params(config)).items():
        s = tuple(leaf.shape)
        if path[-1] == "kernel":
            s = (s[3], s[2], s[0], s[1]) if len(s) == 4 else s[::-1]
        out[flax_path_to_torch_key(path)] = s
    return out


def count(shapes) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())


@pytest.mark.parametrize("name", EXPECTED)
def test_parameter_count(name):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes_of(name)))
    print(f"{name}: {n:,} parameters")
    assert n == EXPECTED[name]


def test_diffusers_default_controlnet_count():
    sd15 = shipped_config("controlnet_sd15")
    cfg = dataclasses.replace(sd15, unet=dataclasses.replace(sd15.unet, cross_attention_dim=1280))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg))) == DIFFUSERS_DEFAULT


def fake_original_file(name, prefix="control_model."):
    """The original-layout state dict of a full-size ControlNet, as zero-stride views (no memory)."""
    config = shipped_config(name)
    km = cnsf.controlnet_keys(config)
    shapes = torch_shapes(config, shapes_of(name))
    return config, shapes, {prefix + km[k]: np.broadcast_to(np.float16(0), s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", EXPECTED)
def test_single_file_layout_maps_one_to_one(name):
    config, shapes, file = fake_original_file(name)
    km = cnsf.controlnet_keys(config)
    assert set(km) == set(shapes)  # every diffusers key has an original name, and no name is extra
    assert len(set(km.values())) == len(km)  # ... and no two share one
    assert len(file) == N_TENSORS[name]
    for key, shape in REAL[name].items():
        assert file["control_model." + key].shape == shape, key
    state, skipped = cnsf.split_controlnet(file)
    assert not skipped
    assert cnsf.infer_base(state) == name and cnsf.conditioning_channels(state) == 3
    sd = cnsf.original_to_diffusers(state, config)
    assert {k: v.shape for k, v in sd.items()} == shapes
    _check_shapes(sd, shapes_of(name), name, {})
    assert count({k: v.shape for k, v in file.items()}) == EXPECTED[name]
    back = cnsf.diffusers_to_original(sd, config, prefix="")
    assert set(back) == set(state)


def theirs(name):
    import diffusers
    import torch

    cfg = json.loads((CONFIGS / name / "config.json").read_text())
    with torch.device("meta"):
        model = diffusers.ControlNetModel.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.live
@pytest.mark.parametrize("name", EXPECTED)
def test_every_diffusers_parameter_maps_one_to_one(name):
    config = shipped_config(name)
    flat = traverse_util.flatten_dict(shapes_of(name))
    ours, their = torch_shapes(config, shapes_of(name)), theirs(name)
    hit, bad, unmapped = set(), [], []
    for key, shape in their.items():
        path = match_torch_key(key, flat)
        if path is None:
            unmapped.append(key)
            continue
        if path in hit:
            bad.append(f"{key}: fills {path} twice")
        hit.add(path)
        if ours[flax_path_to_torch_key(path)] != shape:
            bad.append(f"{key}: theirs {shape}, ours {ours[flax_path_to_torch_key(path)]}")
    print(f"{name}: {len(their)} tensors, {count(their):,} parameters")
    assert count(their) == EXPECTED[name]  # the hard-coded counts are diffusers'
    assert not unmapped, unmapped[:10]
    assert not bad, bad[:10]
    assert len(hit) == len(flat)


@pytest.mark.live
def test_diffusers_default_is_sd15_with_1280_wide_context():
    import diffusers
    import torch

    with torch.device("meta"):
        model = diffusers.ControlNetModel()
    assert sum(p.numel() for p in model.parameters()) == DIFFUSERS_DEFAULT
    assert model.config.cross_attention_dim == 1280


@pytest.mark.live
@pytest.mark.parametrize("name", EXPECTED)
def test_diffusers_reads_the_original_layout_the_same_way(name):
    """diffusers' ``convert_controlnet_checkpoint`` on our full-size original-layout keys gives its own model's keys
    and shapes (except SDXL's ``label_emb``, which diffusers does not convert; ours maps it as the U-Net's)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config, shapes, file = fake_original_file(name)
    cfg = json.loads((CONFIGS / name / "config.json").read_text())
    got = {k: tuple(v.shape) for k, v in convert_controlnet_checkpoint(file, cfg).items()}
    want = {k: s for k, s in theirs(name).items() if not k.startswith("add_embedding.")}
    assert got == want
