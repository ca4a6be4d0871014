"""Load a single-file original checkpoint into the same ``Checkpoint`` a diffusers folder gives.

The architecture comes from the key names (``detect_architecture``); the
configs from the shipped real ones (``sd_jax/model_configs``) or from a
diffusers folder passed as ``config_dir``.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib

from sd_jax.convert import single_file as sf
from sd_jax.convert.diffusers import flax_path_to_torch_key, load_torch_state_dict
from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.loading.diffusers import MODEL_COMPONENTS, Checkpoint, read_json
from sd_jax.loading.registry import class_name_of, component_for
from sd_jax.loading.safetensors_io import read_safetensors, refuse_pickle

SHIPPED_CONFIGS = {
    "sd1": "sd15",
    "sd1_inpaint": "sd15_inpaint",
    "sd2": "sd21",
    "sdxl": "sdxl_base",
    "x4_upscaler": "sd_x4_upscaler",
}


def shipped_config_dir(arch: str) -> pathlib.Path:
    if arch not in SHIPPED_CONFIGS:
        raise UnsupportedArchitectureError(
            f"single file: detected {arch!r}, for which no config ships; pass config_dir= a diffusers folder "
            "(or model_index.json + configs) describing it"
        )
    return pathlib.Path(str(importlib.resources.files("sd_jax") / "model_configs" / SHIPPED_CONFIGS[arch]))


def _diffusers_keys(mod, config) -> list[str]:
    import jax

    params = mod.abstract_params(config)
    return [flax_path_to_torch_key(tuple(k.key for k in p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def key_maps_for(arch: str, configs: dict) -> dict[str, dict]:
    """{component: {diffusers key: (original key, slice)}} for the given (config objects by component)."""
    maps = {}
    for name, (mod, config) in configs.items():
        keys = _diffusers_keys(mod, config)
        kw = {}
        if name == "unet":
            attn = tuple(t.startswith("CrossAttn") for t in config.down_block_types)
            kw["unet_shape"] = (tuple(config.layers_per_block), attn)
        if name == "vae":
            kw["vae_levels"] = len(config.block_out_channels)
        maps[name] = sf._key_map(name, keys, arch, **kw)
    return maps


def load_single_file(path: os.PathLike | str, *, config_dir=None, dtype=None, allow_pickle: bool = False) -> Checkpoint:
    import jax.numpy as jnp

    path = pathlib.Path(path)
    refuse_pickle(path, allow_pickle)
    if path.suffix != ".safetensors":
        from sd_jax.loading.pickle_io import read_pickle

        state = read_pickle(path)
    else:
        state = read_safetensors(path)
    arch = sf.detect_architecture(state)
    in_key = "model.diffusion_model.input_blocks.0.0.weight"
    if in_key in state:
        arch = sf.refine_architecture(arch, state[in_key].shape[1])
    folder = pathlib.Path(config_dir) if config_dir else shipped_config_dir(arch)
    index = read_json(folder / "model_index.json")
    configs, classes = {}, {}
    for name in MODEL_COMPONENTS:
        if name not in sf.PREFIXES:  # e.g. the safety checker: never part of a single-file checkpoint
            continue
        if not index.get(name) or index[name][0] is None:
            continue
        cfg = read_json(folder / name / "config.json")
        comp = component_for(class_name_of(cfg, str(folder / name)), str(folder / name))
        mod, config_cls, _ = comp.load()
        configs[name] = (mod, config_cls.from_diffusers_config(cfg))
        classes[name] = comp
    maps = key_maps_for(arch, configs)
    ignored = sf.check_all_used(state, list(maps.values()), source=str(path))
    models = {}
    for name, (mod, config) in configs.items():
        sub = sf.original_to_diffusers(state, maps[name], source=f"{path} ({name})")
        target = mod.abstract_params(config, param_dtype=dtype or jnp.float32)
        models[name] = (config, load_torch_state_dict(sub, target, source=f"{path} ({name})"))
    sched = folder / "scheduler" / "scheduler_config.json"
    return Checkpoint(folder, index, models, read_json(sched) if sched.exists() else {}, ignored, path)


def save_single_file(path: os.PathLike | str, ckpt: Checkpoint, arch: str) -> pathlib.Path:
    """Write a checkpoint in the original single-file layout (what community tools load)."""
    from sd_jax.convert.diffusers import to_torch_state_dict
    from sd_jax.loading.safetensors_io import write_safetensors

    configs = {}
    for name, (config, _) in ckpt.models.items():
        if name not in sf.PREFIXES:
            continue
        comp = component_for(class_name_of(config.to_diffusers_config(), name), name)
        configs[name] = (comp.load()[0], config)
    maps = key_maps_for(arch, configs)
    out = {}
    for name, (_, params) in ckpt.models.items():
        if name not in maps:
            continue
        out.update(sf.diffusers_to_original(to_torch_state_dict(params), maps[name]))
    write_safetensors(path, out)
    return pathlib.Path(path)
