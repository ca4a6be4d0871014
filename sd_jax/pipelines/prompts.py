"""Deprecated names of the pipeline's old text side, kept as thin aliases.

Prompt encoding is :func:`sd_jax.components.encode_prompt` (and :mod:`sd_jax.pipelines.conditioning` for the
pipeline's cond/uncond); ``sdxl_time_ids`` and ``sdxl_text_conditioning`` live in :mod:`sd_jax.components`. The
text encoders' weights are ``pipe.params["text_encoder"]`` (and ``"text_encoder_2"``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from sd_jax import components as C
from sd_jax.pipelines import conditioning

_MOVED = {"sdxl_time_ids": C.sdxl_time_ids, "sdxl_text_conditioning": C.sdxl_text_conditioning}


@dataclasses.dataclass
class _TextEncoders:
    """The old ``TextEncoders(tokenizers, modules, params)`` value, accepted by ``StableDiffusion(text=...)``."""

    tokenizers: list
    modules: list
    params: list[Any]
    sdxl: bool = False
    force_zeros_for_empty_prompt: bool = False


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"sd_jax.pipelines.prompts.{name} moved to sd_jax.components.{name}", DeprecationWarning, 2)
        return _MOVED[name]
    if name == "TextEncoders":
        warnings.warn("TextEncoders is deprecated: build the pipeline with StableDiffusion.from_components(comps, "
                      "params) (sd_jax.components)", DeprecationWarning, 2)  # fmt: skip
        return _TextEncoders
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def legacy_components(params: dict | None, *, unet, vae, text, schedule, scheduler_config=None,
                      pipeline_class: str = "") -> tuple[C.Components, dict]:  # fmt: skip
    """``(components, params)`` of the old constructor ``StableDiffusion(unet=, vae=, text=, schedule=, params=)``."""
    warnings.warn("StableDiffusion(unet=, vae=, text=, schedule=) is deprecated: use "
                  "StableDiffusion.from_components(comps, params)", DeprecationWarning, 3)  # fmt: skip
    raw = scheduler_config or {"_class_name": "EulerDiscreteScheduler", **dataclasses.asdict(schedule)}
    comps = C.Components(unet=unet, vae=vae, text_encoders=tuple(text.modules), tokenizers=tuple(text.tokenizers),
                         schedule=schedule, scheduler_config=dict(raw), pipeline_class=pipeline_class,
                         force_zeros_for_empty_prompt=text.force_zeros_for_empty_prompt)  # fmt: skip
    return comps, {**(params or {}), **dict(zip(comps.text_names, text.params))}


class TextView:
    """``pipe.text`` (deprecated): the old ``TextEncoders`` face of a pipeline; ``params`` reads and writes the
    text encoders' entries of ``pipe.params``."""

    def __init__(self, pipe):
        self._pipe = pipe
        comps = pipe.components
        self.tokenizers, self.modules, self.sdxl = list(comps.tokenizers), list(comps.text_encoders), comps.sdxl
        self.force_zeros_for_empty_prompt = comps.force_zeros_for_empty_prompt

    @property
    def params(self) -> list:
        return [self._pipe.params[n] for n in self._pipe.components.text_names]

    @params.setter
    def params(self, values) -> None:
        self._pipe.params.update(zip(self._pipe.components.text_names, values))

    def ids(self, prompts):
        return list(C.tokenize_prompts(self._pipe.components, prompts))

    def encode(self, prompts, clip_skip=None) -> dict:
        return conditioning.encode(self._pipe.components, self._pipe.params, prompts, clip_skip)

    def encode_negative(self, negative, n: int, clip_skip=None) -> dict:
        return conditioning.encode_negative(self._pipe.components, self._pipe.params, negative, n, clip_skip)
