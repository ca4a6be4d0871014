"""Moved to :mod:`sd_jax.data` (``folder.py``, ``shapes.py``); these modules stay importable until callers switch."""
