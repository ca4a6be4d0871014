"""Device mesh and the rules that map logical axis names to mesh axes.

Models speak only logical names (``batch``, ``embed``, ``mlp``, ``heads``,
``conv_in``, ``conv_out``, ``norm``, ``vocab``). This module is the only place
that names mesh axes (``data``, ``fsdp``, ``tensor``). A strategy is a few
lines of rules; one mesh axis of size -1 takes the remaining devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical -> mesh rules. The batch is split over every data-like axis.
RULES = {
    "dp": (("batch", ("data", "fsdp")),),
    "fsdp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
    ),
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
    ),
}


def make_mesh(shape: dict[str, int] | Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A ``Mesh`` over ``("data", "fsdp", "tensor")``; one size may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape {sizes} must give one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {sizes} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def rules_for(strategy: str | Sequence) -> tuple:
    """A rule preset by name (``dp``, ``fsdp``, ``fsdp_tp``) or rules given explicitly."""
    if isinstance(strategy, str):
        if strategy not in RULES:
            raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {sorted(RULES)}")
        return RULES[strategy]
    return tuple(strategy)


def _divisible(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """Drop a mesh axis from a dim it does not divide (small layers stay replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def abstract_params(module: nn.Module, *args, **kwargs) -> Any:
    """``module``'s parameters as shapes only (``jax.eval_shape`` of its init), logical axis boxes kept: what
    :func:`param_shardings` reads."""
    return jax.eval_shape(lambda k: module.init(k, *args, **kwargs), jax.random.key(0))["params"]


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules) -> Any:
    """``NamedSharding`` per param from the logical names that ``nn.with_logical_partitioning`` attached."""
    specs = nn.get_partition_spec(boxed_abstract)
    shapes = nn.meta.unbox(boxed_abstract)
    mesh_specs = jax.tree.map(
        lambda s: nn.logical_to_mesh_axes(s, rules_for(rules)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _divisible(spec, leaf.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard axis 0 over the data-like mesh axes; replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_from_flag(spec: str | None, devices=None) -> Mesh | None:
    """The mesh of a ``--mesh DATA,FSDP,TENSOR`` flag (one size may be -1: the rest of the devices). ``None``:
    every device on the data axis, or no mesh on a single device."""
    devices = list(jax.devices() if devices is None else devices)
    if spec is None:
        return make_mesh((-1, 1, 1), devices) if len(devices) > 1 else None
    try:
        shape = tuple(int(v) for v in spec.split(","))
    except ValueError:
        shape = ()
    if len(shape) != len(MESH_AXES) or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"--mesh {spec}: write DATA,FSDP,TENSOR sizes (one may be -1), e.g. -1,1,1 or 2,4,1")
    try:
        return make_mesh(shape, devices)
    except ValueError as e:
        raise ValueError(f"--mesh {spec}: {e}") from None
