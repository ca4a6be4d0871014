"""Opt-in loading of pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``). Imports torch lazily.

:func:`read_state_file` reads one weights file of either kind: ``.safetensors``, or a pickle when allowed.

Only reached after the caller passed ``allow_pickle=True``; torch's
``weights_only`` unpickler is still used, so only tensors and plain containers load.
"""

from __future__ import annotations

import importlib
import pathlib

import numpy as np

from sd_jax.errors import CheckpointError, CorruptCheckpointError


class TorchMissingError(CheckpointError, ImportError):
    """A pickle checkpoint was allowed, but torch, which unpickles it, is not installed."""


def read_pickle(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        torch = importlib.import_module("torch")  # opt-in path only: the runtime never needs torch
    except ImportError:
        raise TorchMissingError(
            f"{path}: loading a pickle checkpoint needs torch, which is not installed ; pip install torch==2.13.0, "
            "or convert the file to .safetensors on a machine that has torch"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: could not be unpickled ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {
        k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in obj.items() if hasattr(v, "numpy")
    }


def read_state_file(path: pathlib.Path, allow_pickle: bool, what: str = "a checkpoint file") -> dict[str, np.ndarray]:
    """A ``.safetensors`` file, or a pickle (``allow_pickle`` only); any other suffix is refused naming ``what``."""
    from sd_jax.loading.safetensors_io import PICKLE_SUFFIXES, read_safetensors, refuse_pickle

    refuse_pickle(path, allow_pickle)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise CorruptCheckpointError(
            f"{path}: not {what} (suffix {path.suffix or 'none'!r}) ; pass a .safetensors file "
            f"(or {'/'.join(PICKLE_SUFFIXES)} with allow_pickle=True) or a diffusers folder"
        )
    return read_pickle(path)
