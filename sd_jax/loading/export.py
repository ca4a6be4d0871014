"""Write our parameters back out as a diffusers folder that ``from_pretrained`` loads.

The round trip is exact: tensors are written in the checkpoint's layout and
dtype-preserving (fp32 stays fp32; pass ``dtype`` to save e.g. fp16). A folder is written into a temporary
sibling and moved into place at the end, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from sd_jax.convert.diffusers import to_torch_state_dict
from sd_jax.errors import SDJaxError
from sd_jax.loading.diffusers import Checkpoint
from sd_jax.loading.registry import class_name_of, component_for
from sd_jax.loading.safetensors_io import write_safetensors

SHIPPED_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "tokenizer_files"


class OutputPathError(SDJaxError, ValueError):
    """An export destination that cannot be written (a file where a folder is wanted, read-only, ...)."""


def check_output(path: os.PathLike | str, *, folder: bool) -> pathlib.Path:
    """Refuse, before any work, an output that is the wrong kind, sits under a file, or cannot be written."""
    path = pathlib.Path(path)
    if path.exists() and folder and not path.is_dir():
        raise OutputPathError(f"{path}: is a file; the export writes a folder there (pick a new or existing folder)")
    if path.is_dir() and not folder:
        raise OutputPathError(f"{path}: is a folder; name a file, e.g. {path / 'model.safetensors'}")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{path}: {parent} is a file, so nothing can be written under it")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write_test_"):
            pass
    except OSError as e:
        raise OutputPathError(f"{path}: cannot write in {parent} ({e.strerror or e}); pick a writable place") from None
    return path


def _move_into(tmp: pathlib.Path, folder: pathlib.Path) -> None:
    """Move everything written under ``tmp`` into ``folder`` (replacing entries of the same name), then drop tmp."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    for entry in tmp.iterdir():
        dest = folder / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(entry, dest)
    tmp.rmdir()


def save_component(folder: os.PathLike | str, config: Any, params: Any, *, dtype=None) -> pathlib.Path:
    """``config.json`` plus ``<stem>.safetensors`` for one model."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config.to_diffusers_config()
    comp = component_for(class_name_of(cfg, str(folder)), str(folder))
    state = to_torch_state_dict(params)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    else:
        state = {k: np.asarray(v) for k, v in state.items()}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_safetensors(folder / f"{comp.weights}.safetensors", state)
    return folder


def save_checkpoint(folder: os.PathLike | str, ckpt: Checkpoint, *, dtype=None) -> pathlib.Path:
    """A whole pipeline folder: ``model_index.json``, every model, the scheduler and the tokenizers."""
    final = check_output(folder, folder=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        _write_checkpoint(tmp, ckpt, dtype)
        _move_into(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def pipeline_index(
    models, *, force_zeros_for_empty_prompt: bool = True, scheduler_class: str = "EulerDiscreteScheduler"
) -> dict:
    """``model_index.json`` of a txt2img pipeline of ``models`` (names: SDXL when ``text_encoder_2`` is one, the
    refiner when it is the only one), as diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
    ``StableDiffusionXLImg2ImgPipeline`` save it; :func:`save_checkpoint` adds an entry per model. SD 1/2 without a
    safety checker (``requires_safety_checker`` false)."""
    sdxl = "text_encoder_2" in models
    if sdxl and "text_encoder" not in models:  # the SDXL refiner, as diffusers' StableDiffusionXLImg2ImgPipeline
        return {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                "tokenizer": [None, None], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", scheduler_class], "force_zeros_for_empty_prompt": False,
                "requires_aesthetics_score": True}  # fmt: skip
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"}
    for name in ("tokenizer", "tokenizer_2")[: 2 if sdxl else 1]:
        index[name] = ["transformers", "CLIPTokenizer"]
    index["scheduler"] = ["diffusers", scheduler_class]
    if sdxl:
        index["force_zeros_for_empty_prompt"] = bool(force_zeros_for_empty_prompt)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def scheduler_config(schedule, scheduler_class: str = "EulerDiscreteScheduler") -> dict:
    """``scheduler_config.json`` of a trained :class:`~sd_jax.schedules.NoiseSchedule`."""
    import dataclasses

    return {"_class_name": scheduler_class, **dataclasses.asdict(schedule)}


def save_components(folder: os.PathLike | str, comps, params: dict, *, vae_config=None, dtype=None) -> pathlib.Path:
    """A :class:`~sd_jax.components.Components` value and its ``params`` as a diffusers folder (the trained schedule
    as an Euler scheduler; ``vae_config`` replaces the VAE's, e.g. with a measured ``scaling_factor``)."""
    models = {"unet": (comps.unet.config, params["unet"]), "vae": (vae_config or comps.vae.config, params["vae"])}
    for name, module in zip(comps.text_names, comps.text_encoders):
        models[name] = (module.config, params[name])
    index = pipeline_index(models, force_zeros_for_empty_prompt=comps.index.get("force_zeros_for_empty_prompt", True))
    src = Checkpoint(comps.path or pathlib.Path(folder), index, models, scheduler_config(comps.schedule))
    return save_checkpoint(folder, src, dtype=dtype)


def _write_checkpoint(folder: pathlib.Path, ckpt: Checkpoint, dtype) -> None:
    index = dict(ckpt.index)
    for name, (config, params) in ckpt.models.items():
        save_component(folder / name, config, params, dtype=dtype)
        cfg = config.to_diffusers_config()
        index[name] = ["transformers" if "architectures" in cfg else "diffusers", class_name_of(cfg, name)]
    if ckpt.scheduler_config:
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(ckpt.scheduler_config, indent=2) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
        if name not in index or not index[name] or index[name][0] is None:
            continue
        src = ckpt.tokenizer_dir(name)
        dst = folder / name
        if src is not None and src.resolve() != dst.resolve():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        if not (dst / "vocab.json").exists():  # configs-only checkpoints use the shipped vocabulary
            dst.mkdir(exist_ok=True)
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(SHIPPED_TOKENIZER / f, dst / f)
        encoder = ckpt.models.get(name.replace("tokenizer", "text_encoder"))
        length = getattr(encoder[0], "max_position_embeddings", None) if encoder else None
        if length and not (dst / "tokenizer_config.json").exists():
            # without it transformers' tokenizer has no length, and diffusers pads prompts to model_max_length
            config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": length}
            (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    from sd_jax.loading.diffusers import MODEL_COMPONENTS

    for name in MODEL_COMPONENTS:  # listed but not loaded (a single file has no safety checker): say so
        if index.get(name) and name not in ckpt.models:
            index[name] = [None, None]
    fe = ckpt.tokenizer_dir("feature_extractor")
    if "safety_checker" in ckpt.models and fe is not None and fe.resolve() != (folder / "feature_extractor").resolve():
        shutil.copytree(fe, folder / "feature_extractor", dirs_exist_ok=True)
    elif "safety_checker" not in ckpt.models and "feature_extractor" in index:
        index["feature_extractor"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
