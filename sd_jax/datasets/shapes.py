"""Moved to :mod:`sd_jax.data.shapes`; these names stay importable here until callers switch."""

from sd_jax.data.shapes import (
    ALL_COMBINATIONS,
    COLORS,
    HELD_OUT,
    IMAGE_SIZE,
    PALETTE,
    SEEN,
    SHAPES,
    SIZE_RANGE,
    SPLITS,
    builder,
    caption,
    draw,
    example,
    prepare,
)

__all__ = ["ALL_COMBINATIONS", "COLORS", "HELD_OUT", "IMAGE_SIZE", "PALETTE", "SEEN", "SHAPES", "SIZE_RANGE", "SPLITS",
           "builder", "caption", "draw", "example", "prepare"]  # fmt: skip
