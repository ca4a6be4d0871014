"""The embedded default model (trained here from scratch; see the README). None until it ships."""

from __future__ import annotations

import importlib.resources
import pathlib


def default_model_path() -> pathlib.Path | None:
    path = pathlib.Path(str(importlib.resources.files("sd_jax") / "default_model"))
    return path if (path / "model_index.json").is_file() else None
