"""Where the parameters of a :class:`~sd_jax.components.Components` live on a mesh: one owner for training and
sampling.

:func:`param_shardings` reads the logical axis names the modules attach to their weights (``embed``, ``mlp``,
``heads``, ``conv_out``, ...) and maps them through a rule preset of :mod:`sd_jax.sharding` (``dp`` replicates,
``fsdp`` splits the weights over the ``fsdp`` axis, ``fsdp_tp`` also over ``tensor``). :func:`place` puts a
params dict there; :func:`bytes_per_device` reads the result back from the arrays' own shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sd_jax import sharding as shard_lib
from sd_jax.models import controlnet as cn_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib


def boxed(comps, name: str):
    """Boxed abstract params (logical axis names attached) of one component of ``comps``."""
    if name == "unet":
        args, extra = unet_lib._dummy_inputs(comps.unet.config)
        return shard_lib.abstract_params(comps.unet, *args, **extra)
    if name == "vae":
        return shard_lib.abstract_params(comps.vae, vae_lib._dummy(comps.vae.config))
    text = comps.text_encoders[comps.text_names.index(name)]
    return shard_lib.abstract_params(text, jnp.zeros((1, text.config.max_position_embeddings), jnp.int32))


def param_shardings(comps, names, mesh, rules) -> dict:
    """``{name: NamedSharding tree}`` for the components ``names`` under ``rules`` (a preset name or rules)."""
    return {n: shard_lib.param_shardings(boxed(comps, n), mesh, rules) for n in names}


def controlnet_shardings(model, mesh, rules):
    """The ``NamedSharding`` tree of one ControlNet module's params (its logical names are the U-Net's)."""
    args, extra = cn_lib._dummy_inputs(model.config)
    return shard_lib.param_shardings(shard_lib.abstract_params(model, *args, **extra), mesh, rules)


def place(tree, shardings):
    """``tree``'s arrays moved to ``shardings`` (a matching tree of ``NamedSharding``)."""
    return jax.tree.map(jax.device_put, tree, shardings)


def bytes_per_device(tree) -> dict:
    """``{device: bytes}`` of ``tree``'s arrays: the sizes of the shards each device holds."""
    out: dict = {}
    for a in jax.tree.leaves(tree):
        for shard in a.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
