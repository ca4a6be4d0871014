"""Deprecated: moved to :mod:`sd_jax.data` (``folder.py``, ``shapes.py``). The modules ``image_folder`` and
``shapes`` still import here; each of their names warns a DeprecationWarning naming its new home."""
