"""Load and save ControlNets as users have them.

- a diffusers folder (or Hub id) holding ``ControlNetModel``;
- one ``.safetensors`` file: lllyasviel's original layout (``input_hint_block``, ``zero_convs``,
  ``middle_block_out``, with or without ``control_model.``) or diffusers names, as diffusers'
  ``ControlNetModel.from_single_file`` reads them. Its config is ``config=`` (a folder, a
  ``config.json`` or a ``ControlNetConfig``) or the shipped one of its base, told from the tensors
  (``sd_jax/model_configs/controlnet_{sd15,sd21,sdxl}``). ``.pth``/``.ckpt`` pickles need ``allow_pickle``.

Export writes a diffusers folder (:func:`save_controlnet`) or an original-layout file
(:func:`save_controlnet_single_file`, what A1111 and ComfyUI load).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np

from sd_jax.convert import controlnet_single_file as cnsf
from sd_jax.convert.diffusers import flax_path_to_torch_key, load_torch_state_dict, to_torch_state_dict
from sd_jax.errors import (
    CheckpointError,
    MissingComponentError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)
from sd_jax.loading.diffusers import load_component, read_json, resolve
from sd_jax.loading.export import _move_into, check_output, save_component
from sd_jax.loading.pickle_io import read_state_file
from sd_jax.loading.safetensors_io import write_safetensors
from sd_jax.models.controlnet import ControlNetConfig, abstract_params

log = logging.getLogger(__name__)


def shipped_config(name: str) -> ControlNetConfig:
    """``controlnet_sd15`` / ``controlnet_sd21`` / ``controlnet_sdxl`` from ``sd_jax/model_configs``."""
    path = pathlib.Path(str(importlib.resources.files("sd_jax") / "model_configs" / name / "config.json"))
    return ControlNetConfig.from_diffusers_config(read_json(path))


def load_controlnet(path_or_id: os.PathLike | str, *, config=None, dtype=None, allow_pickle: bool = False):
    """``(ControlNetConfig, params)`` from a diffusers ControlNet folder, a Hub id or a single file, strictly."""
    if pathlib.Path(path_or_id).is_file():
        return load_controlnet_file(path_or_id, config=config, dtype=dtype, allow_pickle=allow_pickle)
    folder = resolve(path_or_id)
    loaded, params = load_component(folder, dtype=dtype, allow_pickle=allow_pickle)
    if not isinstance(loaded, ControlNetConfig):
        raise UnsupportedArchitectureError(
            f"{folder}: config.json describes a {type(loaded).__name__}, not a ControlNetModel"
        )
    return loaded, params


def _config_from(config, where: str) -> ControlNetConfig:
    if isinstance(config, ControlNetConfig):
        return config
    path = pathlib.Path(config)
    cfg = read_json(path / "config.json" if path.is_dir() else path)
    if cfg.get("_class_name") != "ControlNetModel":
        raise UnsupportedArchitectureError(
            f"{where}: config {path} describes a {cfg.get('_class_name')!r}, not a ControlNetModel"
        )
    return ControlNetConfig.from_diffusers_config(cfg)


def _read(path: pathlib.Path, allow_pickle: bool) -> dict:
    return read_state_file(path, allow_pickle, "a ControlNet file")


def _check_shapes(state: dict, target, source: str, names: dict[str, str]) -> None:
    """Shape mismatches named by the file's own keys (``names``: diffusers key -> key in the file)."""
    import flax.linen as nn
    from flax import traverse_util

    bad = []
    for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(target)).items():
        key = flax_path_to_torch_key(path)
        s = tuple(leaf.shape)
        want = (s[3], s[2], s[0], s[1]) if path[-1] == "kernel" and len(s) == 4 else s  # HWIO -> OIHW
        want = want[::-1] if path[-1] == "kernel" and len(s) == 2 else want
        if key in state and tuple(np.shape(state[key])) != want:
            bad.append(f"{names.get(key, key)}: file {tuple(np.shape(state[key]))}, this config needs {want}")
    if bad:
        raise ShapeMismatchError(f"{source}: {len(bad)} shape mismatch(es):" + "".join(f"\n  {b}" for b in bad[:20]))


def load_controlnet_file(path: os.PathLike | str, *, config=None, dtype=None, allow_pickle: bool = False):
    """``(ControlNetConfig, params)`` of a single-file ControlNet (see the module docstring)."""
    import jax.numpy as jnp

    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingComponentError(f"{path}: no such file")
    raw = _read(path, allow_pickle)
    state, skipped = cnsf.split_controlnet(raw, str(path))
    if skipped:
        log.info("%s: skipped %d tensors outside control_model. (the base model, buffers)", path, len(skipped))
    if config is not None:
        cn = _config_from(config, str(path))
    else:
        cn = shipped_config(cnsf.infer_base(state, str(path)))
        cn = dataclasses.replace(cn, conditioning_channels=cnsf.conditioning_channels(state) or 3)
    diffusers = cnsf.is_diffusers_layout(state)
    try:
        prefix = cnsf.PREFIX if any(k.startswith(cnsf.PREFIX) for k in raw) else ""
        names = {k: prefix + v for k, v in cnsf.controlnet_keys(cn).items()} if not diffusers else {}
        sd = dict(state) if diffusers else cnsf.original_to_diffusers(state, cn, source=str(path), prefix=prefix)
        target = abstract_params(cn, param_dtype=dtype or jnp.float32)
        _check_shapes(sd, target, str(path), names)
        return cn, load_torch_state_dict(sd, target, source=str(path))
    except CheckpointError as e:
        if config is not None:
            raise
        raise type(e)(
            f"{path}: its tensors do not fit the shipped ControlNet config of its base (a resized, tiny or "
            "modified model?) ; pass config= a diffusers ControlNet folder or config.json\n" + str(e)
        ) from None


def check_base(config: ControlNetConfig, unet_config, where: str) -> None:
    """A ControlNet built for another base (text width, SDXL or not, latent channels) is refused by name."""
    u = config.unet
    for what, mine, theirs in (
        ("cross_attention_dim", u.cross_attention_dim, unet_config.cross_attention_dim),
        ("addition_embed_type", u.addition_embed_type, unet_config.addition_embed_type),
        ("block_out_channels", u.block_out_channels, unet_config.block_out_channels),
    ):
        if mine != theirs:
            raise UnsupportedArchitectureError(
                f"{where}: ControlNet {what}={mine!r} but the model's U-Net has {theirs!r}; "
                "this ControlNet was trained for another base model"
            )


# -- export --


def save_controlnet(folder: os.PathLike | str, config: ControlNetConfig, params, *, dtype=None) -> pathlib.Path:
    """A diffusers ControlNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
    ``ControlNetModel.from_pretrained`` loads; written beside and moved into place, so a failure leaves nothing."""
    final = check_output(folder, folder=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        save_component(tmp, config, params, dtype=dtype)
        _move_into(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_controlnet_single_file(
    path: os.PathLike | str, config: ControlNetConfig, params, *, prefix: str = cnsf.PREFIX, dtype=None
) -> pathlib.Path:
    """One ``.safetensors`` in lllyasviel's original layout (``prefix="control_model."`` as his files, or ``""``)."""
    path = check_output(path, folder=False)
    state = to_torch_state_dict(params)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    write_safetensors(path, cnsf.diffusers_to_original(state, config, prefix))
    return path
