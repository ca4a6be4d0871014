"""Old module paths kept importable: :func:`moved` gives a shim module the ``__getattr__`` that warns.

Nothing in ``sd_jax`` imports a shim, so only code still on the old names sees the warning.
"""

from __future__ import annotations

import importlib
import warnings


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """The one deprecation message: ``old`` (a qualified name) is deprecated; use ``new``."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


def moved(old: str, names: dict[str, str]):
    """A module ``__getattr__`` for the shim ``old``: each name in ``names`` (old name -> ``"package.module.new"``)
    warns a :class:`DeprecationWarning` naming its new home whenever it is read (``from old import name`` too),
    then is that object."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, _, attr = names[name].rpartition(".")
        warn(f"{old}.{name}", names[name], stacklevel=3)
        return getattr(importlib.import_module(module), attr)

    return __getattr__
