"""Deprecated: moved to :mod:`sd_jax.data.shapes`. Each name still imports here, with a DeprecationWarning naming
its new home."""

from sd_jax.deprecation import moved

_MOVED = ["ALL_COMBINATIONS", "COLORS", "HELD_OUT", "IMAGE_SIZE", "PALETTE", "SEEN", "SHAPES", "SIZE_RANGE", "SPLITS",
          "builder", "caption", "draw", "example", "prepare"]  # fmt: skip
__all__ = list(_MOVED)
__getattr__ = moved(__name__, {n: f"sd_jax.data.shapes.{n}" for n in _MOVED})
