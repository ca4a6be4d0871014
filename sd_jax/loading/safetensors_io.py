"""Read and write ``.safetensors`` files with numpy, and refuse pickles.

The format is an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` and the raw bytes. Reading it
ourselves gives bfloat16 support (through ``ml_dtypes``), memory-mapped loads
and errors that name the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
import weakref
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from sd_jax.errors import CorruptCheckpointError, UnsafeCheckpointError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def refuse_pickle(path: os.PathLike | str, allow_pickle: bool = False) -> None:
    if str(path).endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path}: pickle checkpoints can run arbitrary code when loaded, so they are refused. "
            "Convert it to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust "
            "the file; that path needs torch installed."
        )


def read_header(path: pathlib.Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: file of {size} bytes is too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CorruptCheckpointError(
                f"{path}: header length {n} exceeds the file size {size} (truncated or not safetensors)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    return header, 8 + n


def read_safetensors(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """All tensors of one file as (memory-mapped) numpy arrays."""
    path = pathlib.Path(path)
    refuse_pickle(path)
    header, start = read_header(path)
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    if isinstance(data, np.memmap):
        _MAPS[:] = [r for r in _MAPS if r() is not None] + [weakref.ref(data)]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry {info!r} ({e})"
            ) from None
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != n or start + end > size:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} {info['dtype']}{list(shape)} needs {n} bytes at [{begin}, {end}) "
                f"but the file has {size - start} data bytes (truncated?)"
            )
        out[name] = data[start + begin : start + end].view(dtype).reshape(shape)
    return out


_MAPS: list[weakref.ref] = []  # the files read_safetensors has mapped (arrays are unhashable: no WeakSet)


def drop_mapped_pages() -> None:
    """Take the pages of every mapped checkpoint file out of this process's resident memory (``MADV_DONTNEED``):
    once a tensor has been copied into a device buffer, its file pages need not stay resident beside it. The
    mappings stay valid: a later read faults the pages back in from the file."""
    for ref in list(_MAPS):
        raw = getattr(ref(), "_mmap", None)
        if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                raw.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # closed, or a platform that refuses it: the pages just stay
                pass


def write_safetensors(path: os.PathLike | str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    path = pathlib.Path(path)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset, arrays = 0, []
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # ascontiguousarray makes 0-d arrays 1-d
        if arr.dtype not in NAMES:
            raise TypeError(f"{name}: dtype {arr.dtype} cannot be written to safetensors")
        header[name] = {
            "dtype": NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)  # never leave a half-written file under the real name
