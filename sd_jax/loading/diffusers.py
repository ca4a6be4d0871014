"""Load diffusers-format folders (and Hub ids) into our configs and parameter trees.

A folder holds ``model_index.json`` and one subfolder per component, each with
a ``config.json`` and weights: ``<stem>.safetensors``, an fp16/other
``variant`` (``<stem>.fp16.safetensors``) or shards listed in
``<stem>.safetensors.index.json``. Every load is strict (see
``sd_jax.convert.diffusers``): nothing is dropped or left unfilled silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from sd_jax.convert.diffusers import load_torch_state_dict
from sd_jax.errors import CorruptCheckpointError, MissingComponentError
from sd_jax.loading.registry import class_name_of, component_for
from sd_jax.loading.safetensors_io import PICKLE_SUFFIXES, read_header, read_safetensors, refuse_pickle

MODEL_COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "unet", "safety_checker")


def read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingComponentError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_sharded(index_path: pathlib.Path) -> dict[str, np.ndarray]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index_path}: no 'weight_map' in the shard index")
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        path = index_path.parent / shard
        if not path.exists():
            raise MissingComponentError(f"{index_path}: shard {shard} is listed but missing from {index_path.parent}")
        state.update(read_safetensors(path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CorruptCheckpointError(
            f"{index_path}: {len(missing)} tensor(s) listed but absent from the shards: {missing[:10]}"
        )
    return state


def read_weights(folder: pathlib.Path, stem: str, variant: str | None = None, allow_pickle: bool = False):
    """The state dict of one component folder and the file it came from (for messages)."""
    v = f".{variant}" if variant else ""
    single = folder / f"{stem}{v}.safetensors"
    index = folder / (f"{stem}.safetensors.index{v}.json" if variant else f"{stem}.safetensors.index.json")
    if single.exists():
        return read_safetensors(single), str(single)
    if index.exists():
        return _read_sharded(index), str(index)
    pickles = [p for p in sorted(folder.glob(f"{stem}{v}*")) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(pickles[0], allow_pickle)
        from sd_jax.loading.pickle_io import read_pickle

        return read_pickle(pickles[0]), str(pickles[0])
    have = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    raise MissingComponentError(
        f"{folder}: no weights found (looked for {single.name} and {index.name}); the folder has {have}"
    )


def read_component_config(folder: os.PathLike | str):
    """``(Component, model module, our config)`` of one model folder from its ``config.json`` alone (no weights)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise MissingComponentError(f"component folder {folder} does not exist")
    cfg_dict = read_json(folder / "config.json")
    comp = component_for(class_name_of(cfg_dict, str(folder / "config.json")), str(folder / "config.json"))
    mod, config_cls, _ = comp.load()
    return comp, mod, config_cls.from_diffusers_config(cfg_dict)


def parameter_count(path: os.PathLike | str) -> int:
    """Tensor elements in the models of a pipeline folder, from the safetensors headers alone (no weights read).

    Variant files (``*.fp16.safetensors``) count only where a component has no plain file.
    """
    path = pathlib.Path(path)
    index = read_json(path / "model_index.json")
    total = 0
    for name in MODEL_COMPONENTS:
        if not index.get(name) or index[name][0] is None or not (path / name).is_dir():
            continue
        files = sorted((path / name).glob("*.safetensors"))
        plain = [f for f in files if f.name.count(".") == 1]
        for f in plain or files[:1]:
            header, _ = read_header(f)
            total += sum(int(np.prod(v["shape"], dtype=np.int64)) for k, v in header.items() if k != "__metadata__")
    return total


def load_component(
    path: os.PathLike | str, subfolder: str | None = None, *, dtype=None, variant=None, allow_pickle=False
):
    """``(config, params)`` for one model folder (``path/subfolder``) of a diffusers checkpoint.

    ``dtype`` is the parameter dtype (default float32; fp16 checkpoints are upcast).
    """
    import jax.numpy as jnp

    folder = pathlib.Path(path) / subfolder if subfolder else pathlib.Path(path)
    comp, mod, config = read_component_config(folder)
    state, source = read_weights(folder, comp.weights, variant, allow_pickle)
    state = comp.normalize_keys(state)
    target = mod.abstract_params(config, param_dtype=dtype or jnp.float32)
    return config, load_torch_state_dict(state, target, source=source)


@dataclasses.dataclass
class Checkpoint:
    """A loaded diffusers pipeline folder: configs and params per model, plus the rest of its files."""

    path: pathlib.Path
    index: dict[str, Any]
    models: dict[str, tuple[Any, Any]]  # name -> (config, params)
    scheduler_config: dict[str, Any]
    ignored_keys: list[str] = dataclasses.field(default_factory=list)  # single files: non-parameters skipped
    source: pathlib.Path | None = None

    @property
    def pipeline_class(self) -> str:
        return self.index.get("_class_name", "")

    def tokenizer_dir(self, name: str = "tokenizer") -> pathlib.Path | None:
        d = self.path / name
        return d if d.is_dir() else None

    def config(self, name: str):
        return self.models[name][0]

    def params(self, name: str):
        return self.models[name][1]


def resolve(path_or_id: os.PathLike | str) -> pathlib.Path:
    """A local folder, or a Hub id downloaded (safetensors and configs only) when online."""
    p = pathlib.Path(path_or_id)
    if p.is_file():
        if p.name == "model_index.json":
            raise MissingComponentError(f"{p} is the index of a diffusers folder ; pass the folder {p.parent} instead")
        raise MissingComponentError(
            f"{p} is a file, not a diffusers folder ; load single-file checkpoints with load_single_file "
            "(StableDiffusion.load and sample.py --model take either)"
        )
    if p.exists():
        return p
    s = str(path_or_id)
    if s.count("/") == 1 and not s.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return pathlib.Path(
                snapshot_download(
                    s, allow_patterns=["*.json", "*.safetensors", "*.txt"], ignore_patterns=["*.bin", "*.ckpt"]
                )
            )
        except Exception as e:  # offline, unknown repo, gated...
            raise MissingComponentError(f"{s!r} is not a local path and could not be fetched from the Hub: {e}") from e
    raise MissingComponentError(f"{s!r}: no such file or folder")


def load_checkpoint(path_or_id: os.PathLike | str, *, dtype=None, variant=None, allow_pickle=False) -> Checkpoint:
    """Load every model of a diffusers pipeline folder (or Hub id)."""
    path = resolve(path_or_id)
    index = read_json(path / "model_index.json")
    models = {}
    for name in MODEL_COMPONENTS:
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        if not (path / name).is_dir():
            raise MissingComponentError(
                f"{path}/model_index.json lists {name!r} but the folder {path / name} is missing"
            )
        models[name] = load_component(path, name, dtype=dtype, variant=variant, allow_pickle=allow_pickle)
    if "unet" not in models or "vae" not in models:
        raise MissingComponentError(f"{path}: a pipeline needs at least 'unet' and 'vae' (found {sorted(models)})")
    sched = path / "scheduler" / "scheduler_config.json"
    return Checkpoint(path, index, models, read_json(sched) if sched.exists() else {})
