"""diffusers ``StableDiffusionSafetyChecker``: a CLIP vision tower scored against 17 + 3 concept embeddings.

The CLIP vision tower is :mod:`sd_jax.models.clip_vision`'s (shared with the IP-Adapter image encoder).
Parameters mirror the PyTorch state dict (transformers 5 layout, ``vision_model.embeddings...``; older
files' ``vision_model.vision_model.`` root is renamed on load). The scoring follows diffusers exactly,
including its rounding of scores to three decimals and the 0.01 adjustment after a "special care" hit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.models.clip import ACTIVATIONS
from sd_jax.models.clip_vision import CLIP_MEAN, CLIP_STD, VisionTransformer, preprocess
from sd_jax.models.layers import Dtype, dense

__all__ = ["CLIP_MEAN", "CLIP_STD", "SafetyChecker", "SafetyCheckerConfig", "flag_images", "preprocess"]


@dataclasses.dataclass(frozen=True)
class SafetyCheckerConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> SafetyCheckerConfig:
        v = cfg.get("vision_config", {})
        act = v.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(f"safety checker config: hidden_act={act!r} is not supported")
        return cls(
            hidden_size=v.get("hidden_size", 768),
            intermediate_size=v.get("intermediate_size", 3072),
            num_hidden_layers=v.get("num_hidden_layers", 12),
            num_attention_heads=v.get("num_attention_heads", 12),
            image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", 32),
            projection_dim=cfg.get("projection_dim", 512),
            hidden_act=act,
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        return {
            "architectures": ["StableDiffusionSafetyChecker"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "vision_config": {
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_act": self.hidden_act,
                "layer_norm_eps": self.layer_norm_eps,
            },
        }


class SafetyChecker(nn.Module):
    """``__call__(clip_input NHWC, normalized) -> (cos to concepts [B, 17], cos to special-care [B, 3])``."""

    config: SafetyCheckerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, clip_input):
        cfg = self.config
        pooled, _ = VisionTransformer(cfg, self.dtype, self.param_dtype, name="vision_model")(clip_input)
        emb = dense(cfg.projection_dim, use_bias=False, name="visual_projection", param_dtype=self.param_dtype)(pooled)
        ones = nn.initializers.ones_init()
        concept = self.param("concept_embeds", ones, (17, cfg.projection_dim), self.param_dtype)
        special = self.param("special_care_embeds", ones, (3, cfg.projection_dim), self.param_dtype)
        self.param("concept_embeds_weights", ones, (17,), self.param_dtype)
        self.param("special_care_embeds_weights", ones, (3,), self.param_dtype)

        def cos(a, b):
            a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
            b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
            return a @ b.T

        return cos(emb.astype(jnp.float32), concept), cos(emb.astype(jnp.float32), special)


def flag_images(cos_concept, cos_special, params) -> np.ndarray:
    """diffusers' decision: any rounded concept score > 0, after a +0.01 adjustment on a special-care hit."""
    cos_concept, cos_special = np.asarray(cos_concept, np.float32), np.asarray(cos_special, np.float32)
    w_c = np.asarray(params["concept_embeds_weights"], np.float32)
    w_s = np.asarray(params["special_care_embeds_weights"], np.float32)
    flags = []
    for i in range(cos_concept.shape[0]):
        adjustment = 0.0
        for j in range(cos_special.shape[1]):
            if round(float(cos_special[i, j] - w_s[j] + adjustment), 3) > 0:
                adjustment = 0.01
        flags.append(
            any(round(float(cos_concept[i, j] - w_c[j] + adjustment), 3) > 0 for j in range(cos_concept.shape[1]))
        )
    return np.asarray(flags)


def abstract_params(config: SafetyCheckerConfig, param_dtype=jnp.float32):
    model = SafetyChecker(config, param_dtype=param_dtype)
    x = jnp.zeros((1, config.image_size, config.image_size, 3))
    return nn.meta.unbox(jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))["params"])
