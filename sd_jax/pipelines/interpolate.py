"""Spherical interpolation between seeds (noise) and between prompt embeddings.

Gaussian noise lives near a sphere of radius sqrt(d); linear interpolation
between two draws passes through low-norm points the model never saw, so the
frames wash out. ``slerp`` keeps the norm (Shoemake 1985; White 2016,
"Sampling Generative Networks").
"""

from __future__ import annotations

import jax.numpy as jnp


def slerp(a, b, t, eps: float = 1e-7):
    """Spherical interpolation of whole arrays ``a`` -> ``b`` at ``t`` in [0, 1]; linear if nearly parallel."""
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    na, nb = jnp.linalg.norm(a32), jnp.linalg.norm(b32)
    dot = jnp.clip(jnp.sum(a32 * b32) / (na * nb + eps), -1.0, 1.0)
    theta = jnp.arccos(dot)
    sin = jnp.sin(theta)
    wa = jnp.where(sin > 1e-4, jnp.sin((1 - t) * theta) / jnp.where(sin > 1e-4, sin, 1.0), 1 - t)
    wb = jnp.where(sin > 1e-4, jnp.sin(t * theta) / jnp.where(sin > 1e-4, sin, 1.0), t)
    return (wa * a32 + wb * b32).astype(a.dtype)


def slerp_path(a, b, frames: int):
    """``frames`` points from ``a`` to ``b`` inclusive, stacked on a new leading axis."""
    ts = jnp.linspace(0.0, 1.0, frames)
    return jnp.stack([slerp(a, b, t) for t in ts])
