"""Random weights from a tree of shapes, drawn with numpy: jitting ``model.init`` of a U-Net takes
a minute or more of XLA compilation on CPU, and the values only need a sane scale for timing.

Kernels ~ N(0, 1/fan_in) (fan_in: every axis but the last), biases 0, norm scales 1, anything
else (embeddings) ~ N(0, 0.02²). Used by the ``ours`` and ``diffusers_flax`` workers.
"""

from __future__ import annotations

import math

import numpy as np


def random_like(shapes, seed: int = 0, dtype=np.float32):
    """``shapes``: a pytree of objects with ``.shape`` (e.g. ``jax.eval_shape`` output) -> numpy arrays."""
    import jax

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        shape = tuple(leaf.shape)
        if name == "bias":
            return np.zeros(shape, dtype)
        if name == "scale":
            return np.ones(shape, dtype)
        std = 1.0 / math.sqrt(max(math.prod(shape[:-1]), 1)) if name == "kernel" else 0.02
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
