"""Map PyTorch (diffusers/transformers) state dicts to our Flax params and back.

Our modules are named after the PyTorch modules, so the mapping is one rule:
``a.b.0.c.weight`` -> ``("a", "b_0", "c", leaf)``, where ``leaf`` is the Flax
name of that weight: ``kernel`` (Linear: transposed; Conv2d: OIHW -> HWIO),
``scale`` (norms) or ``embedding`` (Embedding). Which one is decided by our own
parameter tree, so the mapping can never guess.

Loading is strict: a tensor that maps nowhere, a parameter left unfilled and a
shape mismatch all raise, listing every offending key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sd_jax.errors import MissingParameterError, ShapeMismatchError, UnexpectedKeyError

# Buffers that PyTorch saves but that are not parameters.
IGNORED_SUFFIXES = ("position_ids",)
# Flax segments that end in ``_<digits>`` but are not list indices.
NOT_AN_INDEX = frozenset({"linear_1", "linear_2"})
_MAX_LISTED = 20


def torch_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """``"down_blocks.0.resnets.1.conv1.weight"`` -> ``(("down_blocks_0", "resnets_1", "conv1"), "weight")``."""
    parts = key.split(".")
    leaf = parts[-1]
    path: list[str] = []
    for p in parts[:-1]:
        if p.isdigit() and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), leaf


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_module_path` plus the leaf rename."""
    *mods, leaf = path
    out = []
    for m in mods:
        match = re.fullmatch(r"(.+)_(\d+)", m)
        if match and m not in NOT_AN_INDEX:
            out.extend(match.groups())
        else:
            out.append(m)
    out.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(out)


def _to_flax_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if x.ndim == 4:  # Conv2d OIHW -> HWIO
            return x.transpose(2, 3, 1, 0)
        if x.ndim == 2:  # Linear (out, in) -> (in, out)
            return x.T
    return x


def _to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if x.ndim == 4:
            return x.transpose(3, 2, 0, 1)
        if x.ndim == 2:
            return x.T
    return x


def _fmt(items: list[str]) -> str:
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "\n  " + "\n  ".join(items[:_MAX_LISTED]) + more


def _flat_target(target: Any) -> dict[tuple[str, ...], Any]:
    import flax.linen as nn

    target = nn.meta.unbox(target)
    return traverse_util.flatten_dict(target)


def match_torch_key(key: str, flat_target: Mapping[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    """The Flax path a PyTorch key fills in ``flat_target``, or None."""
    mods, leaf = torch_module_path(key)
    candidates = ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
    hits = [mods + (c,) for c in candidates if mods + (c,) in flat_target]
    return hits[0] if len(hits) == 1 else None


def load_torch_state_dict(
    state: Mapping[str, np.ndarray], target: Any, *, source: str = "checkpoint", dtype=None
) -> dict:
    """Fill the pytree ``target`` (arrays or ``jax.ShapeDtypeStruct``) from a PyTorch state dict.

    ``source`` names the file in error messages. Tensors are cast to the target
    dtype (or ``dtype`` if given), so fp16 checkpoints load into fp32/bf16 params.
    """
    flat_target = _flat_target(target)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        path = match_torch_key(key, flat_target)
        if path is None:
            unexpected.append(key)
            continue
        want = flat_target[path]
        arr = _to_flax_layout(path[-1], np.asarray(value))
        if tuple(arr.shape) != tuple(want.shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(np.asarray(value).shape)} -> {tuple(arr.shape)}, "
                f"ours {'/'.join(path)} {tuple(want.shape)}"
            )
            continue
        out[path] = arr.astype(dtype or want.dtype)
    if unexpected:
        raise UnexpectedKeyError(
            f"{source}: {len(unexpected)} tensor(s) map to no parameter of ours "
            f"(wrong model type or config?):{_fmt(sorted(unexpected))}"
        )
    if mismatched:
        raise ShapeMismatchError(f"{source}: {len(mismatched)} shape mismatch(es):{_fmt(mismatched)}")
    missing = sorted("/".join(p) + f" (torch key {flax_path_to_torch_key(p)})" for p in flat_target if p not in out)
    if missing:
        raise MissingParameterError(
            f"{source}: {len(missing)} parameter(s) of ours were not filled by the checkpoint:{_fmt(missing)}"
        )
    return traverse_util.unflatten_dict(out)


def to_torch_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Our params -> a PyTorch-layout state dict with diffusers/transformers key names."""
    import flax.linen as nn

    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    out = {}
    for path, value in flat.items():
        key = flax_path_to_torch_key(path)
        back = match_torch_key(key, flat)
        if back != path:  # the naming rule must be a bijection
            raise ValueError(f"cannot name parameter {'/'.join(path)} for export (got torch key {key!r})")
        out[key] = _to_torch_layout(path[-1], np.asarray(jax.device_get(value)))
    return out
