"""Textual-inversion embedding files as users have them, read into :class:`sd_jax.textual_inversion.Embedding`.

Layouts (diffusers' ``TextualInversionLoaderMixin.load_textual_inversion`` and A1111 read the same files):

- A1111 / civitai ``.safetensors``: ``{"emb_params": [n, width]}``;
- A1111 ``.pt`` (a pickle: refused unless ``allow_pickle``): ``{"string_to_param": {"*": [n, width]}, ...}``;
- SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (``clip_l`` goes to ``text_encoder``, ``clip_g`` to
  ``text_encoder_2``);
- diffusers ``learned_embeds.safetensors`` (or a folder holding it): ``{token: [width] or [n, width]}``.

The token is the explicit one (``PATH:token`` on the command line), else the key of a diffusers file, else the
file name's stem (as A1111 names it). :func:`load_textual_inversion` swaps the grown models into a pipeline only
after every file has been read and checked.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from sd_jax.errors import CheckpointError, CorruptCheckpointError, MissingComponentError
from sd_jax.loading.pickle_io import TorchMissingError
from sd_jax.loading.safetensors_io import PICKLE_SUFFIXES, read_safetensors, refuse_pickle
from sd_jax.textual_inversion import ONLY, Embedding, add_embeddings

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def parse_embedding_spec(spec: str) -> tuple[str, str | None]:
    """``PATH[:token]`` -> ``(path, token or None)``. The part after the last ``:`` is a token only when it has no
    ``/`` and the path without it exists (so a path that itself holds a ``:`` still works)."""
    spec = str(spec)
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    head, tail = spec.rsplit(":", 1)
    if tail and "/" not in tail and os.path.exists(head):
        return head, tail
    return spec, None


def _resolve(path: pathlib.Path) -> pathlib.Path:
    if path.is_dir():
        for name in DIFFUSERS_NAMES:
            if (path / name).is_file():
                return path / name
        raise MissingComponentError(f"{path}: a folder without {' or '.join(DIFFUSERS_NAMES)}")
    if not path.is_file():
        raise MissingComponentError(f"{path}: no such embedding file")
    return path


def _torch_tree(path: pathlib.Path):
    """A pickle's nested dicts with tensors as float32 numpy (``weights_only``: no code runs)."""
    try:
        torch = importlib.import_module("torch")  # opt-in path only: the runtime never needs torch
    except ImportError:
        raise TorchMissingError(f"{path}: loading a pickle embedding needs torch, which is not installed; "
                                "pip install torch, or convert the file to .safetensors") from None  # fmt: skip
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: could not be unpickled ({e})") from e

    def conv(x):
        if isinstance(x, torch.Tensor):
            return x.detach().float().numpy()
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x

    return conv(obj)


def read_embedding_tree(path, allow_pickle: bool = False):
    """The raw content: a dict (nested for A1111 pickles) or, for ``torch.save(tensor)`` files, one array."""
    path = _resolve(pathlib.Path(path))
    if str(path).endswith(PICKLE_SUFFIXES):
        refuse_pickle(path, allow_pickle)
        return path, _torch_tree(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: unknown embedding file type {path.suffix!r} (expected .safetensors or .pt)")
    return path, read_safetensors(path)


def _matrix(x, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim not in (1, 2) or x.shape[-1] == 0:
        shape = getattr(x, "shape", type(x).__name__)
        raise CheckpointError(f"{where}: expected a [width] or [n_vectors, width] tensor, got {shape}")
    return np.asarray(x, np.float32).reshape(-1, x.shape[-1])


def embedding_from_tree(tree, path: pathlib.Path, token: str | None = None) -> Embedding:
    """The :class:`Embedding` of a file's content; unknown layouts are a :class:`CheckpointError` naming the keys."""
    stem = path.stem
    if isinstance(tree, np.ndarray):
        if token is None:
            raise CheckpointError(f"{path}: holds a bare tensor; name its token (PATH:token)")
        return Embedding(token, {ONLY: _matrix(tree, str(path))}, str(path))
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{path}: not an embedding (empty or not a dict of tensors)")
    if set(SDXL_KEYS) & set(tree):
        missing = [k for k in SDXL_KEYS if k not in tree]
        if missing:
            raise CheckpointError(f"{path}: an SDXL embedding needs both clip_l and clip_g; {missing[0]} is missing")
        vecs = {SDXL_KEYS[k]: _matrix(tree[k], f"{path}: {k}") for k in SDXL_KEYS}
        return Embedding(token or stem, vecs, str(path))
    if "emb_params" in tree:
        return Embedding(token or stem, {ONLY: _matrix(tree["emb_params"], f"{path}: emb_params")}, str(path))
    stp = tree.get("string_to_param")
    if stp is None and "string_to_param.*" in tree:  # a converted A1111 file, flattened
        stp = {"*": tree["string_to_param.*"]}
    if stp is not None:
        if not isinstance(stp, dict) or "*" not in stp:
            raise CheckpointError(f"{path}: string_to_param has no '*' entry")
        return Embedding(token or stem, {ONLY: _matrix(stp["*"], f"{path}: string_to_param['*']")}, str(path))
    if len(tree) == 1:  # diffusers: {token: vector}
        key, value = next(iter(tree.items()))
        return Embedding(token or key, {ONLY: _matrix(value, f"{path}: {key}")}, str(path))
    keys = ", ".join(sorted(map(str, tree))[:8])
    raise CheckpointError(
        f"{path}: unknown embedding layout (keys: {keys}); expected emb_params, string_to_param, clip_l + clip_g, "
        "or one {token: vector} entry"
    )


def load_embedding(spec, token: str | None = None, allow_pickle: bool = False) -> Embedding:
    """One embedding from ``PATH`` or ``PATH:token`` (an explicit ``token`` wins)."""
    path, spec_token = parse_embedding_spec(spec)
    path, tree = read_embedding_tree(path, allow_pickle)
    return embedding_from_tree(tree, path, token or spec_token)


def _specs(path, token) -> list[tuple]:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    tokens = [token] * len(paths) if token is None or isinstance(token, str) else list(token)
    if len(tokens) != len(paths):
        raise ValueError(f"{len(paths)} embedding files but {len(tokens)} tokens")
    if len(paths) > 1 and isinstance(token, str):
        raise ValueError("one token for several embedding files: pass a list of tokens")
    return list(zip(paths, tokens))


def load_embeddings(comps, params: dict, path, token=None, allow_pickle: bool = False):
    """``(components, params)`` with the embedding file(s) ``path`` added (one path or spec, or a list)."""
    embs = [load_embedding(p, t, allow_pickle) for p, t in _specs(path, token)]
    return add_embeddings(comps, params, embs)


def load_textual_inversion(pipe, path, token: str | Sequence[str] | None = None, allow_pickle: bool = False):
    """diffusers' ``pipe.load_textual_inversion`` for a :class:`~sd_jax.pipelines.pipeline.StableDiffusion`:
    reads and checks every file, then swaps in the grown components and params. Returns the added tokens."""
    specs = _specs(path, token)
    embs = [load_embedding(p, t, allow_pickle) for p, t in specs]
    comps, params = add_embeddings(pipe.components, pipe.params, embs)
    pipe.components = comps  # nothing of the pipe changed before this line
    pipe.set_params(params)
    return [t for e in embs for t in e.tokens()]
