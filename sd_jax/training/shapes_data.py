"""Moved to :mod:`sd_jax.data.shapes_source`; these names stay importable here until callers switch."""

from sd_jax.data.shapes_source import DEFAULT_DATA_DIR
from sd_jax.data.shapes_source import ShapesSource as ShapesData

__all__ = ["DEFAULT_DATA_DIR", "ShapesData"]
