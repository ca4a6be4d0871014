"""Deprecated: moved to :mod:`sd_jax.data.shapes_source`. Each name still imports here, with a DeprecationWarning
naming its new home."""

from sd_jax.deprecation import moved

_NAMES = {
    "DEFAULT_DATA_DIR": "sd_jax.data.shapes_source.DEFAULT_DATA_DIR",
    "ShapesData": "sd_jax.data.shapes_source.ShapesSource",
}
__all__ = list(_NAMES)
__getattr__ = moved(__name__, _NAMES)
