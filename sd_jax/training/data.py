"""Moved to :mod:`sd_jax.data`; these names stay importable here until the trainers import them from there."""

from sd_jax.data import make_source
from sd_jax.data.synthetic import SyntheticSource as SyntheticData
from sd_jax.data.tfds import tfds_builder
from sd_jax.data.transforms import preprocess

__all__ = ["SyntheticData", "make_source", "preprocess", "tfds_builder"]
