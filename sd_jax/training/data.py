"""Deprecated: moved to :mod:`sd_jax.data`. Each name still imports here, with a DeprecationWarning naming its new
home."""

from sd_jax.deprecation import moved

_NAMES = {
    "make_source": "sd_jax.data.make_source",
    "SyntheticData": "sd_jax.data.synthetic.SyntheticSource",
    "tfds_builder": "sd_jax.data.tfds.tfds_builder",
    "preprocess": "sd_jax.data.transforms.preprocess",
}
__all__ = list(_NAMES)
__getattr__ = moved(__name__, _NAMES)
