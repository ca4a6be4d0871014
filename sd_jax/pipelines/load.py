"""Loading for the pipeline: a diffusers folder, a single file or a Hub id -> a checkpoint, and the parts beyond
:class:`~sd_jax.components.Components` that only sampling uses: the safety checker (with its feature extractor's
sizes), the x4 upscaler's low-res noise schedule and its ``max_noise_level``.
"""

from __future__ import annotations

import json
import pathlib

from sd_jax.schedules import NoiseSchedule


def read_checkpoint(path, *, config_dir=None, allow_pickle: bool = False):
    """The :class:`~sd_jax.loading.diffusers.Checkpoint` of a folder, Hub id or single ``.safetensors``/``.ckpt``."""
    p = pathlib.Path(str(path))
    if p.is_file():
        from sd_jax.loading.single_file import load_single_file

        return load_single_file(p, config_dir=config_dir, allow_pickle=allow_pickle)
    from sd_jax.loading.diffusers import load_checkpoint

    return load_checkpoint(path, allow_pickle=allow_pickle)


def safety_checker(ckpt) -> tuple | None:
    """``(SafetyChecker module, params, preprocess size, crop)`` when the folder ships one (diffusers'
    ``StableDiffusionSafetyChecker`` and the ``feature_extractor`` sizes it is fed at), else None."""
    if "safety_checker" not in ckpt.models:
        return None
    from sd_jax.models.safety_checker import SafetyChecker

    cfg = ckpt.config("safety_checker")
    size = crop = cfg.image_size
    fe = ckpt.path / "feature_extractor" / "preprocessor_config.json"
    if fe.exists():
        fe_cfg = json.loads(fe.read_text())
        size = fe_cfg.get("size", {}).get("shortest_edge", size)
        crop = fe_cfg.get("crop_size", {}).get("height", crop)
    return SafetyChecker(cfg), ckpt.params("safety_checker"), size, crop


def low_res_schedule(folder) -> NoiseSchedule | None:
    """The x4 upscaler's ``low_res_scheduler`` (how its low-res input is noised), when the folder has one."""
    cfg = pathlib.Path(folder) / "low_res_scheduler" / "scheduler_config.json" if folder else None
    return NoiseSchedule.from_diffusers_config(json.loads(cfg.read_text())) if cfg and cfg.exists() else None


def sampling_parts(ckpt) -> dict:
    """Keyword arguments of :class:`~sd_jax.pipelines.pipeline.StableDiffusion` read from the checkpoint."""
    return {
        "safety": safety_checker(ckpt),
        "low_res_schedule": low_res_schedule(ckpt.path),
        "max_noise_level": int(ckpt.index.get("max_noise_level", 350)),
    }


def scheduler_source(source: str) -> str:
    """Where the scheduler config came from, for messages."""
    return f"{source}/scheduler/scheduler_config.json" if source else "scheduler_config.json"
