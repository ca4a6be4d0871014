"""Read an IP-Adapter file (h94/IP-Adapter layout) into our trees, strictly.

A file holds ``image_proj.*`` (the image projection, :mod:`sd_jax.models.ip_adapter`) and
``ip_adapter.<k>.to_k_ip/to_v_ip.weight`` with ``k = 1, 3, 5, ...`` over the U-Net's cross-attention layers in
diffusers' processor order (down blocks, up blocks, then the mid block; ``attn1`` processors take the even
numbers and have no weights). ``.safetensors`` is read directly; a ``.bin`` is a pickle, refused unless
``allow_pickle``. Every tensor must land somewhere and every parameter must be filled
(:func:`sd_jax.convert.diffusers.load_torch_state_dict`); an adapter built for another cross-attention width or
image encoder fails in one line naming the file, the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sd_jax.convert.diffusers import load_torch_state_dict
from sd_jax.errors import CorruptCheckpointError, MissingComponentError, ShapeMismatchError
from sd_jax.loading.safetensors_io import PICKLE_SUFFIXES, read_safetensors, refuse_pickle
from sd_jax.models import ip_adapter as ipa


@dataclasses.dataclass(frozen=True)
class LoadedIPAdapter:
    config: ipa.IPAdapterConfig
    image_proj: dict  # params of ipa.projection(config)
    unet: dict  # flat {U-Net path: array} of ``.../attn2/processor/to_{k,v}_ip_<index>/kernel``
    source: str


def read_file(path: os.PathLike | str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The flat ``{"image_proj.*", "ip_adapter.*"}`` tensors of one IP-Adapter file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingComponentError(f"IP-Adapter file {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        torch = importlib.import_module("torch")  # opt-in path only
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CorruptCheckpointError(f"{path}: could not be unpickled ({e})") from e
        flat = {f"{group}.{k}": v for group, sd in obj.items() if isinstance(sd, dict) for k, v in sd.items()}
        return {k: v.float().numpy() for k, v in flat.items()}
    return read_safetensors(path)


def _order(path: tuple[str, ...]):
    """diffusers' ``attn_processors`` order: down blocks, up blocks, mid block; indices numerically."""
    rank = {"down": 0, "up": 1, "mid": 2}[path[0].split("_")[0]]
    return rank, [int(n) for p in path for n in re.findall(r"_(\d+)$", p)]


def cross_attention_layers(unet_config) -> list[tuple[tuple[str, ...], int]]:
    """``[(path of an attn2, its width)]`` in diffusers' processor order, from the U-Net's abstract init with one
    dummy adapter (cheap: shapes only)."""
    from sd_jax.models.unet import UNet2DConditionModel, _dummy_inputs

    args, extra = _dummy_inputs(unet_config)
    ip = ((jnp.zeros((1, 1, unet_config.cross_attention_dim)), jnp.float32(1.0)),)
    model = UNet2DConditionModel(unet_config)
    shapes = jax.eval_shape(lambda k: model.init(k, *args, **extra, ip_hidden_states=ip), jax.random.key(0))
    flat = traverse_util.flatten_dict(shapes["params"])
    layers = {p[:-3]: v.value.shape[1] if hasattr(v, "value") else v.shape[1]
              for p, v in flat.items() if p[-2] == "to_k_ip_0"}  # fmt: skip
    return sorted(layers.items(), key=lambda kv: _order(kv[0]))


def _check(source, key, shape, have, want, what):
    if have != want:
        raise ShapeMismatchError(f"{source}: {key} has shape {shape}, but {what}")


def load(path, unet_config, image_encoder_config=None, *, index: int = 0, allow_pickle: bool = False,
         dtype=jnp.float32) -> LoadedIPAdapter:  # fmt: skip
    """One IP-Adapter file for a U-Net of ``unet_config`` (and, when given, an image encoder of that config); its
    attention weights become adapter number ``index`` (``to_k_ip_<index>``)."""
    source = str(path)
    state = read_file(path, allow_pickle)
    groups = {
        g: {k[len(g) + 1 :]: v for k, v in state.items() if k.startswith(g + ".")} for g in ("image_proj", "ip_adapter")
    }
    other = sorted(k for k in state if not k.startswith(("image_proj.", "ip_adapter.")))
    if other or not groups["image_proj"] or not groups["ip_adapter"]:
        raise CorruptCheckpointError(
            f"{source}: not an IP-Adapter file (needs image_proj.* and ip_adapter.* tensors; other keys: {other[:5]})"
        )
    cfg = ipa.IPAdapterConfig.from_state_dict(groups["image_proj"], source)
    cross = unet_config.cross_attention_dim
    out_key = "image_proj.proj_out.weight" if cfg.plus else "image_proj.proj.weight"
    what = f"the U-Net's cross_attention_dim is {cross} (an adapter for another base model?)"
    _check(source, out_key, tuple(state[out_key].shape), cfg.cross_attention_dim, cross, what)
    if image_encoder_config is not None:
        want = image_encoder_config.hidden_size if cfg.plus else image_encoder_config.projection_dim
        in_key = "image_proj.proj_in.weight" if cfg.plus else "image_proj.proj.weight"
        what = f"the image encoder's {'hidden_size' if cfg.plus else 'projection_dim'} is {want} (wrong encoder?)"
        _check(source, in_key, tuple(state[in_key].shape), tuple(state[in_key].shape)[1], want, what)
    layers = cross_attention_layers(unet_config)
    for k, v in sorted(groups["ip_adapter"].items()):
        if k.endswith(".weight") and np.ndim(v) == 2 and v.shape[1] != cross:
            raise ShapeMismatchError(
                f"{source}: ip_adapter.{k} has shape {tuple(v.shape)}, but the U-Net's cross_attention_dim is {cross}"
            )
    target = {f"ip_adapter_{2 * i + 1}": {kv: {"kernel": jax.ShapeDtypeStruct((cross, width), dtype)}
                                          for kv in ("to_k_ip", "to_v_ip")}
              for i, (_, width) in enumerate(layers)}  # fmt: skip
    ip = load_torch_state_dict({"ip_adapter." + k: v for k, v in groups["ip_adapter"].items()}, target, source=source)
    unet = {}
    for i, (attn, _) in enumerate(layers):
        for kv in ("to_k_ip", "to_v_ip"):
            unet[(*attn, "processor", f"{kv}_{index}", "kernel")] = ip[f"ip_adapter_{2 * i + 1}"][kv]["kernel"]
    proj = load_torch_state_dict(groups["image_proj"], ipa.abstract_params(cfg, dtype), source=source)
    return LoadedIPAdapter(cfg, proj, unet, source)
