"""Load a single-file original checkpoint into the same ``Checkpoint`` a diffusers folder gives.

The architecture comes from the tensors (``detect_architecture``); the configs
from the shipped real ones (``sd_jax/model_configs/<name>``) or from a
diffusers folder passed as ``config_dir`` (needed for SD 2.x epsilon models,
since v-prediction cannot be told from the weights, and for tiny test models).
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib

from sd_jax.convert import single_file as sf
from sd_jax.convert.diffusers import load_torch_state_dict, to_torch_state_dict
from sd_jax.errors import (
    CheckpointError,
    MissingComponentError,
    UnexpectedKeyError,
    UnsupportedArchitectureError,
)
from sd_jax.loading.diffusers import Checkpoint, read_component_config, read_json
from sd_jax.loading.pickle_io import read_state_file
from sd_jax.loading.safetensors_io import write_safetensors

SHIPPED_CONFIGS = {
    "sd1": "sd15",
    "sd1_inpaint": "sd15_inpaint",
    "sd2": "sd21",
    "sdxl": "sdxl_base",
    "sdxl_refiner": "sdxl_refiner",
    "x4_upscaler": "sd_x4_upscaler",
}


def shipped_config_dir(arch: str) -> pathlib.Path:
    if arch not in SHIPPED_CONFIGS:
        raise UnsupportedArchitectureError(
            f"single file: detected {arch!r}, for which no config ships ; pass config_dir= a diffusers "
            "folder (model_index.json and one config.json per model) describing it (CLI: --config-dir DIR)"
        )
    return pathlib.Path(str(importlib.resources.files("sd_jax") / "model_configs" / SHIPPED_CONFIGS[arch]))


def layout_for(arch: str, configs: dict[str, dict], unet_config) -> sf.Layout:
    """The key-map ``Layout`` from diffusers/transformers config dicts (by component) and our ``UNetConfig``."""
    vae = configs.get("vae", {})
    texts = tuple(configs[n]["num_hidden_layers"] for n in ("text_encoder", "text_encoder_2") if n in configs)
    return sf.Layout(arch, unet_config, tuple(vae.get("block_out_channels", ())), vae.get("layers_per_block", 0), texts)


def _read(path: pathlib.Path, allow_pickle: bool) -> dict:
    if not path.is_file():
        raise MissingComponentError(f"{path}: no such file")
    if path.name == "model_index.json":
        raise MissingComponentError(
            f"{path} is the index of a diffusers folder ; pass the folder {path.parent} instead"
        )
    return read_state_file(path, allow_pickle)


def _config_hint(arch: str, path: pathlib.Path, e: CheckpointError) -> CheckpointError:
    """The error of a file that does not fit the shipped configs of its architecture, saying what to pass."""
    return type(e)(
        f"{path}: its tensors do not fit the shipped {SHIPPED_CONFIGS[arch]} configs (detected {arch}; a resized, "
        "tiny or modified model?) ; pass config_dir= a diffusers folder with its configs (CLI: --config-dir DIR)\n"
        + str(e)
    )


def load_single_file(path: os.PathLike | str, *, config_dir=None, dtype=None, allow_pickle: bool = False) -> Checkpoint:
    """Every model of a single-file checkpoint as ``(config, params)``, strictly.

    ``dtype`` is the parameter dtype (default float32). Non-parameters (EMA
    copies, schedule buffers, SD 2.x's unused last OpenCLIP block) are skipped
    and listed in ``Checkpoint.ignored_keys``; any other tensor that maps
    nowhere raises ``UnexpectedKeyError``.
    """
    path = pathlib.Path(path)
    state = _read(path, allow_pickle)
    arch = sf.detect_architecture(state)
    parts, report = sf.split_original(state)
    if report["unknown"]:
        raise UnexpectedKeyError(
            f"{path}: {len(report['unknown'])} tensor(s) under no known prefix (model.diffusion_model., "
            f"first_stage_model., cond_stage_model., conditioner.embedders.N.):{sf._fmt(report['unknown'])}"
        )
    folder = pathlib.Path(config_dir) if config_dir else shipped_config_dir(arch)
    index = read_json(folder / "model_index.json")
    names = [n for n in sf.COMPONENTS if index.get(n) and index[n][0] is not None]
    dicts, loaded = {}, {}
    for n in names:
        dicts[n] = read_json(folder / n / "config.json")
        loaded[n] = read_component_config(folder / n)
    layout = layout_for(arch, dicts, loaded["unet"][2] if "unet" in loaded else None)
    try:
        models, ignored = _map_models(path, folder, names, parts, report, layout, loaded, dtype)
    except CheckpointError as e:
        raise (e if config_dir else _config_hint(arch, path, e)) from None
    sched = folder / "scheduler" / "scheduler_config.json"
    return Checkpoint(folder, index, models, read_json(sched) if sched.exists() else {}, sorted(ignored), path)


def _map_models(path, folder, names, parts, report, layout, loaded, dtype):
    """``({name: (config, params)}, ignored keys)``: every model's tensors mapped strictly onto its parameters."""
    import jax.numpy as jnp

    prefixes = tuple(layout.prefix(n) for n in names)
    stray = [k for part in parts.values() for k in part if not k.startswith(prefixes)]
    if stray:
        raise UnexpectedKeyError(
            f"{path}: {len(stray)} tensor(s) belong to no model of {folder / 'model_index.json'} "
            f"(detected {layout.arch}):{sf._fmt(stray)}"
        )
    flat = {k: v for part in parts.values() for k, v in part.items()}
    ignored = list(report["ignored"])
    models = {}
    for n in names:
        comp, mod, config = loaded[n]
        source = f"{path} ({n})"
        sub = comp.normalize_keys(sf.original_to_diffusers(n, flat, layout, source=source, report=ignored))
        target = mod.abstract_params(config, param_dtype=dtype or jnp.float32)
        models[n] = (config, load_torch_state_dict(sub, target, source=source))
    return models, ignored


def save_single_file(path: os.PathLike | str, ckpt: Checkpoint, arch: str) -> pathlib.Path:
    """Write a checkpoint in the original single-file layout (what community tools load)."""
    if arch not in sf.ARCHITECTURES:
        raise UnsupportedArchitectureError(f"single file: arch {arch!r} is not one of {', '.join(sf.ARCHITECTURES)}")
    names = [n for n in sf.COMPONENTS if n in ckpt.models]  # never the safety checker
    dicts = {n: ckpt.config(n).to_diffusers_config() for n in names}
    sf.check_architecture(arch, dicts)  # another architecture's layout would write a file nothing loads
    layout = layout_for(arch, dicts, ckpt.config("unet"))
    out = {}
    for n in names:
        out.update(sf.diffusers_to_original(n, to_torch_state_dict(ckpt.params(n)), layout))
    write_safetensors(path, out)
    return pathlib.Path(path)
