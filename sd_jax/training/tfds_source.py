"""Deprecated: moved to :mod:`sd_jax.data.tfds`. Each name still imports here, with a DeprecationWarning naming its
new home."""

from sd_jax.deprecation import moved

_MOVED = ["MAX_ATTEMPTS", "TfdsSource", "find_keys", "get_field"]
__all__ = list(_MOVED)
__getattr__ = moved(__name__, {n: f"sd_jax.data.tfds.{n}" for n in _MOVED})
