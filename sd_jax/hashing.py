"""The hashes A1111 writes into its infotext, cached per file so a sampling run does not re-read gigabytes.

* ``Model hash``: the first 10 hex digits of the checkpoint file's SHA-256 (A1111's ``shorthash``). A diffusers
  folder has no single file; sd-jax defines its hash as the SHA-256 of the lines ``"<relative path>\\t<SHA-256 of
  the file>\\n"`` of every weight file under it (``.safetensors``, ``.bin``, ``.ckpt``, ``.pt``, ``.pth``,
  ``.msgpack``, ``.onnx``), sorted by relative path (``/``-separated): it changes when any weight changes and
  not when configs, the tokenizer or the folder's location do. A Hub id is hashed as its local snapshot.
* ``Lora hashes``: for a ``.safetensors`` LoRA, kohya's "addnet" hash (A1111's ``addnet_hash_safetensors``): the
  SHA-256 of the file *after* its header (the 8-byte length and the JSON header), first 12 hex digits; other
  files: the file's SHA-256, 12 digits.
* ``TI hashes``: the embedding file's SHA-256, first 12 hex digits (A1111's ``Embedding.shorthash``).
* ControlNet models appear as ``name [first 8 hex]``, as sd-webui-controlnet names them.

The cache is one JSON file, ``$SD_JAX_HASH_CACHE`` or ``~/.cache/sd_jax/hashes.json`` (``SD_JAX_HASH_CACHE=``
empty turns it off): ``{"<kind>:<absolute path>": {"size", "mtime_ns", "sha256"}}``; an entry counts only while
the file's size and mtime are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys

CACHE_ENV = "SD_JAX_HASH_CACHE"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")
_BLOCK = 1 << 20
LOUD_BYTES = 1 << 28  # hashing a larger file says so (it takes a few seconds per GiB)


def cache_path() -> pathlib.Path | None:
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return pathlib.Path.home() / ".cache" / "sd_jax" / "hashes.json"
    return pathlib.Path(value) if value else None


def _load_cache(path: pathlib.Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt, never fatal
    return data if isinstance(data, dict) else {}


def _store(path: pathlib.Path | None, key: str, entry: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_cache(path)  # re-read: another process may have added entries
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time


def _digest(path: pathlib.Path, skip_header: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path, *, addnet: bool = False) -> str:
    """The full SHA-256 hex of a file (``addnet``: of its safetensors data after the header), cached."""
    path = pathlib.Path(path).resolve()
    st = path.stat()
    kind = "addnet" if addnet else "sha256"
    key = f"{kind}:{path}"
    cache = cache_path()
    entry = _load_cache(cache).get(key)
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    if st.st_size > LOUD_BYTES:
        print(f"hashing {path.name} ({st.st_size / 2**30:.1f} GiB) for the image metadata; cached after this once",
              file=sys.stderr)  # fmt: skip
    digest = _digest(path, addnet)
    _store(cache, key, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return digest


def folder_sha256(folder) -> str:
    """sd-jax's hash of a diffusers folder (see the module docstring)."""
    folder = pathlib.Path(folder)
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    lines = "".join(f"{p.relative_to(folder).as_posix()}\t{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _local(model: str) -> pathlib.Path | None:
    p = pathlib.Path(model)
    if p.exists():
        return p
    try:  # a Hub id: its snapshot in the local Hugging Face cache, if there is one (never downloads)
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return None


def model_hash(model) -> str | None:
    """A1111's ``Model hash`` (10 hex) of a checkpoint file, diffusers folder or cached Hub id; None if unknown."""
    p = _local(str(model))
    if p is None:
        return None
    return (folder_sha256(p) if p.is_dir() else file_sha256(p))[:10]


def model_name(model) -> str:
    """A1111's ``Model``: the checkpoint's name (file stem, folder name, or a Hub id's last part), never a path."""
    text = str(model).rstrip("/\\")
    p = pathlib.Path(text)
    if p.exists():
        return p.stem if p.is_file() else p.name
    return text.rsplit("/", 1)[-1]


def lora_hash(path) -> str:
    """A1111's ``Lora hashes`` entry: the addnet hash of a ``.safetensors`` (else the file's SHA-256), 12 hex."""
    p = pathlib.Path(path)
    return file_sha256(p, addnet=p.suffix.lower() == ".safetensors")[:12]


def embedding_hash(path) -> str:
    """A1111's ``TI hashes`` entry: the embedding file's SHA-256, 12 hex (a folder: sd-jax's folder hash)."""
    p = pathlib.Path(path)
    return (folder_sha256(p) if p.is_dir() else file_sha256(p))[:12]


def short_hash8(path) -> str:
    """sd-webui-controlnet's ``[hash]`` after a model name: 8 hex of the file's (a folder: sd-jax's) SHA-256."""
    p = pathlib.Path(path)
    local = _local(str(p))
    if local is None:
        return ""
    return (folder_sha256(local) if local.is_dir() else file_sha256(local))[:8]
