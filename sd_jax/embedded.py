"""The embedded default model and its ControlNet (trained here from scratch; see the README). None until they ship."""

from __future__ import annotations

import importlib.resources
import pathlib


def default_model_path() -> pathlib.Path | None:
    path = pathlib.Path(str(importlib.resources.files("sd_jax") / "default_model"))
    return path if (path / "model_index.json").is_file() else None


def default_controlnet_path() -> pathlib.Path | None:
    """The shapes ControlNet trained on the embedded model (a diffusers ControlNet folder), if this version ships it."""
    path = pathlib.Path(str(importlib.resources.files("sd_jax") / "default_controlnet"))
    return path if (path / "config.json").is_file() else None
