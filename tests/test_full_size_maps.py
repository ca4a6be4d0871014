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
# Parameter counts of the real checkpoints (position_ids buffers excluded).
EXPECTED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sd15_inpaint", "unet"): 859_535_364,
    ("sd21", "unet"): 865_910_724,
    ("sdxl_base", "unet"): 2_567_463_684,
}


def ours(name, sub):
    cfg = json.loads((CONFIGS / name / sub / "config.json").read_text())
    comp = component_for(class_name_of(cfg, f"{name}/{sub}"), f"{name}/{sub}")
    mod, config_cls, _ = comp.load()
    return cfg, mod.abstract_params(config_cls.from_diffusers_config(cfg))


@pytest.mark.parametrize("name,sub", MODELS)
def test_parameter_count(name, sub):
    pytest.importorskip({"vae": "sd_jax.models.vae", "unet": "sd_jax.models.unet"}.get(sub, "sd_jax.models.clip"))
    _, params = ours(name, sub)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"{name}/{sub}: {n:,} parameters")
    if (name, sub) in EXPECTED:
        assert n == EXPECTED[(name, sub)]


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
    pytest.importorskip({"vae": "sd_jax.models.vae", "unet": "sd_jax.models.unet"}.get(sub, "sd_jax.models.clip"))
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
    print(
        f"{name}/{sub}: {len(torch_shapes)} tensors, {sum(int(np.prod(s)) for s in torch_shapes.values()):,} parameters"
    )
    assert not unmapped, unmapped[:10]
    assert not bad, bad[:10]
    assert not leftover, leftover[:10]
