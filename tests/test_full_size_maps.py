"""Full-size architectures: every diffusers parameter maps to exactly one of ours, same shape, none left over.

No weights are allocated: ours come from ``jax.eval_shape``, diffusers'/transformers'
from models built on torch's meta device.
"""

import importlib.resources
import json

import jax
import numpy as np
import pytest

from sd_jax.convert.diffusers import match_torch_key
from sd_jax.loading.registry import class_name_of, component_for

CONFIGS = importlib.resources.files("sd_jax") / "model_configs"
MODELS = [
    (name, sub)
    for name in ("sd15", "sd15_inpaint", "sd21", "sdxl_base", "sd_x4_upscaler")
    for sub in ("text_encoder", "text_encoder_2", "vae", "unet")
    if (CONFIGS / name / sub / "config.json").is_file()
]
# Parameter counts (position_ids buffers excluded) of the diffusers/transformers PyTorch models built from the
# same config.json on torch's meta device: sum(p.numel() for p in model.parameters()), torch 2.13 / diffusers /
# transformers of the reference extra; test_every_diffusers_parameter_maps_one_to_one recomputes them. They agree
# with the published counts: SD 1.5 U-Net 859,520,964, SDXL U-Net 2,567,463,684, CLIP ViT-L/14 text 123,060,480,
# OpenCLIP ViT-H text 340,387,840, OpenCLIP bigG text + projection 694,659,840, SD VAE 83,653,863.
EXPECTED = {
    ("sd15", "text_encoder"): 123_060_480,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "unet"): 859_520_964,
    ("sd15_inpaint", "text_encoder"): 123_060_480,
    ("sd15_inpaint", "vae"): 83_653_863,
    ("sd15_inpaint", "unet"): 859_535_364,  # conv_in takes 9 channels: + 5 * 320 * 9 weights
    ("sd21", "text_encoder"): 340_387_840,
    ("sd21", "vae"): 83_653_863,
    ("sd21", "unet"): 865_910_724,
    ("sdxl_base", "text_encoder"): 123_060_480,
    ("sdxl_base", "text_encoder_2"): 694_659_840,
    ("sdxl_base", "vae"): 83_653_863,
    ("sdxl_base", "unet"): 2_567_463_684,
    ("sd_x4_upscaler", "text_encoder"): 340_387_840,
    ("sd_x4_upscaler", "vae"): 55_325_927,
    ("sd_x4_upscaler", "unet"): 473_398_020,
}


def ours(name, sub):
    cfg = json.loads((CONFIGS / name / sub / "config.json").read_text())
    comp = component_for(class_name_of(cfg, f"{name}/{sub}"), f"{name}/{sub}")
    mod, config_cls, _ = comp.load()
    return cfg, mod.abstract_params(config_cls.from_diffusers_config(cfg))


@pytest.mark.parametrize("name,sub", MODELS)
def test_parameter_count(name, sub):
    _, params = ours(name, sub)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"{name}/{sub}: {n:,} parameters")
    assert n == EXPECTED[(name, sub)]


def test_every_model_has_an_expected_count():
    assert sorted(MODELS) == sorted(EXPECTED)


def theirs(cfg):
    import torch

    cls_name = class_name_of(cfg, "config")
    with torch.device("meta"):
        if cls_name.startswith("CLIP"):
            import transformers

            config = transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
            model = getattr(transformers, cls_name)(config)
        else:
            import diffusers

            model = getattr(diffusers, cls_name).from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    return component_for(cls_name, "config").normalize_keys(shapes)


@pytest.mark.live
@pytest.mark.parametrize("name,sub", MODELS)
def test_every_diffusers_parameter_maps_one_to_one(name, sub):
    cfg, params = ours(name, sub)
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    torch_shapes = theirs(cfg)
    hit, bad, unmapped = set(), [], []
    for key, shape in torch_shapes.items():
        path = match_torch_key(key, flat)
        if path is None:
            unmapped.append(key)
            continue
        if path in hit:
            bad.append(f"{key}: fills {path} twice")
        hit.add(path)
        ours_shape = flat[path].shape
        want = shape[::-1] if len(shape) == 2 and path[-1] == "kernel" else shape
        if len(shape) == 4:
            want = (shape[2], shape[3], shape[1], shape[0])
        if tuple(ours_shape) != tuple(want):
            bad.append(f"{key}: theirs {shape}, ours {tuple(ours_shape)}")
    leftover = sorted("/".join(p) for p in flat if p not in hit)
    n = sum(int(np.prod(s)) for s in torch_shapes.values())
    print(f"{name}/{sub}: {len(torch_shapes)} tensors, {n:,} parameters")
    assert n == EXPECTED[(name, sub)]  # the hard-coded counts are the reference's
    assert not unmapped, unmapped[:10]
    assert not bad, bad[:10]
    assert not leftover, leftover[:10]
