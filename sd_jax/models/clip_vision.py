"""transformers ``CLIPVisionModelWithProjection`` (and the vision tower the safety checker shares) in Flax.

Parameters mirror the PyTorch state dict: ``vision_model.embeddings...``, ``vision_model.encoder.layers.<i>...``,
``vision_model.post_layernorm`` and ``visual_projection`` (no bias). ``__call__(pixels NHWC, normalized)`` returns
``(image_embeds, hidden_states)`` with ``hidden_states`` as transformers counts them: the embeddings after
``pre_layrnorm`` first, then every layer's output, so ``hidden_states[-2]`` is what IP-Adapter Plus uses.
:func:`preprocess` is ``CLIPImageProcessor`` in numpy/Pillow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.models.clip import ACTIVATIONS, Encoder
from sd_jax.models.layers import Dtype, dense, embed, layer_norm, logical

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> CLIPVisionConfig:
        """A transformers ``CLIPVisionConfig`` ``config.json`` (missing keys take transformers' defaults)."""
        arch = (cfg.get("architectures") or ["CLIPVisionModelWithProjection"])[0]
        if arch != "CLIPVisionModelWithProjection":
            raise UnsupportedArchitectureError(f"image encoder config: architectures={arch!r} is not supported")
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(f"image encoder config: hidden_act={act!r} is not supported")
        if cfg.get("num_channels", 3) != 3:
            raise UnsupportedArchitectureError(f"image encoder config: num_channels={cfg['num_channels']} != 3")
        return cls(
            hidden_size=cfg.get("hidden_size", 768),
            intermediate_size=cfg.get("intermediate_size", 3072),
            num_hidden_layers=cfg.get("num_hidden_layers", 12),
            num_attention_heads=cfg.get("num_attention_heads", 12),
            image_size=cfg.get("image_size", 224),
            patch_size=cfg.get("patch_size", 32),
            projection_dim=cfg.get("projection_dim", 512),
            hidden_act=act,
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        return {
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
        }


class VisionEmbeddings(nn.Module):
    """transformers ``CLIPVisionEmbeddings``: patch conv (no bias), CLS token, learned positions."""

    config: Any
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
            name="patch_embedding",
        )(pixels)  # fmt: skip
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.hidden_size)).astype(patches.dtype), patches], axis=1)
        pos = embed(
            x.shape[1], cfg.hidden_size, name="position_embedding", axes=(None, "embed"), param_dtype=self.param_dtype
        )
        return x + pos(jnp.arange(x.shape[1]))[None]


class VisionTransformer(nn.Module):
    """transformers ``CLIPVisionTransformer``: patches + CLS, pre-LN, encoder, post-LN on the CLS token.

    Returns ``(pooled, hidden_states)``; ``hidden_states[0]`` is the pre-LN embeddings, then one per layer.
    """

    config: Any  # any config with the CLIPVisionConfig fields (the safety checker's too)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        x = VisionEmbeddings(cfg, name="embeddings", param_dtype=self.param_dtype)(pixels.astype(self.dtype))
        x = layer_norm(name="pre_layrnorm", eps=cfg.layer_norm_eps, param_dtype=self.param_dtype)(x).astype(self.dtype)
        hidden = [x, *Encoder(cfg, causal=False, name="encoder", dtype=self.dtype, param_dtype=self.param_dtype)(x)]
        pooled = layer_norm(name="post_layernorm", eps=cfg.layer_norm_eps, param_dtype=self.param_dtype)(
            hidden[-1][:, 0]
        )
        return pooled, tuple(hidden)


class CLIPVisionModelWithProjection(nn.Module):
    """``__call__(pixels NHWC normalized) -> (image_embeds [B, projection_dim], hidden_states)``."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        pooled, hidden = VisionTransformer(cfg, self.dtype, self.param_dtype, name="vision_model")(pixels)
        embeds = dense(cfg.projection_dim, use_bias=False, name="visual_projection", param_dtype=self.param_dtype)(
            pooled
        )
        return embeds, hidden


def preprocess(images: np.ndarray, size: int, crop: int | None = None) -> np.ndarray:
    """CLIPImageProcessor as diffusers calls it: uint8 PIL, shortest side -> ``size`` (bicubic), center crop,
    scale to [0, 1], CLIP mean/std. ``images`` are [0, 1] floats (N)HWC; returns NHWC float32."""
    from PIL import Image

    crop = crop or size
    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    out = []
    for img in (images * 255).round().astype(np.uint8):
        pil = Image.fromarray(img)
        w, h = pil.size
        s = size / min(w, h)
        new = (int(w * s), size) if w > h else (size, int(h * s))  # transformers truncates the long side
        pil = pil.resize(new, Image.BICUBIC)
        w, h = pil.size
        left, top = (w - crop) // 2, (h - crop) // 2
        arr = np.asarray(pil.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
        out.append((arr - CLIP_MEAN) / CLIP_STD)
    return np.stack(out)


def abstract_params(config: CLIPVisionConfig, param_dtype=jnp.float32):
    model = CLIPVisionModelWithProjection(config, param_dtype=param_dtype)
    x = jnp.zeros((1, config.image_size, config.image_size, 3))
    return nn.meta.unbox(jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))["params"])
