"""Which of our modules implements each diffusers/transformers class.

Entries name a module path so that importing the loader does not import
every model. Each module provides a ``*Config`` with ``from_diffusers_config``
and ``to_diffusers_config``, ``abstract_params(config)`` and a model class.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from sd_jax.errors import UnsupportedArchitectureError


@dataclasses.dataclass(frozen=True)
class Component:
    module: str  # e.g. "sd_jax.models.unet"
    config: str  # the config class name in that module
    model: str  # the nn.Module class name
    weights: str  # file stem diffusers/transformers use: "diffusion_pytorch_model" or "model"
    # transformers 5 saves CLIPTextModel without the ``text_model.`` root that older files (and ours) use.
    root: str | None = None
    root_exempt: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()  # (old prefix, new prefix) applied first

    def normalize_keys(self, state: dict) -> dict:
        for old, new in self.renames:
            state = {new + k[len(old) :] if k.startswith(old) else k: v for k, v in state.items()}
        if self.root is None:
            return state
        return {k if k.startswith((self.root, *self.root_exempt)) else self.root + k: v for k, v in state.items()}

    def load(self):
        mod = importlib.import_module(self.module)
        return mod, getattr(mod, self.config), getattr(mod, self.model)


MODELS = {
    "StableDiffusionSafetyChecker": Component(
        "sd_jax.models.safety_checker",
        "SafetyCheckerConfig",
        "SafetyChecker",
        "model",
        renames=(("vision_model.vision_model.", "vision_model."),),
    ),
    "UNet2DConditionModel": Component(
        "sd_jax.models.unet", "UNetConfig", "UNet2DConditionModel", "diffusion_pytorch_model"
    ),
    "ControlNetModel": Component(
        "sd_jax.models.controlnet", "ControlNetConfig", "ControlNetModel", "diffusion_pytorch_model"
    ),
    "AutoencoderKL": Component("sd_jax.models.vae", "VAEConfig", "AutoencoderKL", "diffusion_pytorch_model"),
    "CLIPTextModel": Component(
        "sd_jax.models.clip", "CLIPTextConfig", "CLIPTextModel", "model", "text_model.", ("text_projection.",)
    ),
    "CLIPTextModelWithProjection": Component(
        "sd_jax.models.clip", "CLIPTextConfig", "CLIPTextModel", "model", "text_model.", ("text_projection.",)
    ),
    "CLIPVisionModelWithProjection": Component(
        "sd_jax.models.clip_vision", "CLIPVisionConfig", "CLIPVisionModelWithProjection", "model"
    ),
}


def component_for(class_name: str, where: str) -> Component:
    try:
        return MODELS[class_name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"{where}: model class {class_name!r} is not supported (supported: {', '.join(sorted(MODELS))})"
        ) from None


def class_name_of(config: dict[str, Any], where: str) -> str:
    """diffusers configs carry ``_class_name``; transformers configs carry ``architectures``."""
    if "_class_name" in config:
        return config["_class_name"]
    if config.get("architectures"):
        return config["architectures"][0]
    if config.get("model_type") in ("clip_text_model", "clip"):
        return "CLIPTextModel"
    raise UnsupportedArchitectureError(f"{where}: config names no model class (_class_name / architectures)")
