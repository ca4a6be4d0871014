"""Moved to :mod:`sd_jax.data.tfds`; these names stay importable here until the trainers import them from there."""

from sd_jax.data.tfds import MAX_ATTEMPTS, TfdsSource, find_keys, get_field

__all__ = ["MAX_ATTEMPTS", "TfdsSource", "find_keys", "get_field"]
