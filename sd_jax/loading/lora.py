"""LoRA ``.safetensors`` files: read any supported naming, write diffusers/peft (or kohya) naming.

``pipe.save_lora_weights(dir)`` writes ``dir/pytorch_lora_weights.safetensors``; a folder is accepted for
that file. Loading is strict: every tensor must land on a layer of the given base parameters.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_jax.convert.lora import lora_from_state_dict, lora_to_state_dict
from sd_jax.loading.safetensors_io import read_header, read_safetensors, refuse_pickle, write_safetensors
from sd_jax.models.lora import Lora

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers ``LORA_WEIGHT_NAME_SAFE``


def resolve_lora_file(path: os.PathLike | str) -> pathlib.Path:
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / DIFFUSERS_LORA_FILE
    if not p.is_file():
        raise FileNotFoundError(f"LoRA {path}: no such file (give a .safetensors file or a folder with "
                                f"{DIFFUSERS_LORA_FILE})")  # fmt: skip
    refuse_pickle(p)
    return p


def read_lora_file(path: os.PathLike | str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, ``__metadata__``) of a LoRA file."""
    p = resolve_lora_file(path)
    header, _ = read_header(p)
    return read_safetensors(p), dict(header.get("__metadata__") or {})


def load_lora(path: os.PathLike | str, params: Mapping[str, Any], *, unet_config=None) -> Lora:
    """A LoRA file checked against the base ``{component: params}`` it will be merged into.

    ``unet_config`` (our ``UNetConfig``) enables kohya files on the original SD layout (``input_blocks_*``).
    """
    p = resolve_lora_file(path)
    state, meta = read_lora_file(p)
    tree, alphas = lora_from_state_dict(state, meta, params, unet_config=unet_config, source=str(p))
    return Lora(tree, alphas)


def save_lora(path: os.PathLike | str, lora: Lora, *, naming: str = "diffusers", dtype=None) -> pathlib.Path:
    """Write ``lora`` as one ``.safetensors`` (a folder path gets ``pytorch_lora_weights.safetensors``)."""
    import jax

    p = pathlib.Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / DIFFUSERS_LORA_FILE
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = lora_to_state_dict(jax.device_get(lora.params), lora.alphas, naming=naming)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    write_safetensors(p, tensors, meta)
    return p
