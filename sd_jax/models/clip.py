"""transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` as a Flax Linen module.

SD 1.x uses OpenAI's ViT-L/14 text tower (quick_gelu), SD 2.x OpenCLIP ViT-H
(gelu) and SDXL both CLIP-L and OpenCLIP bigG with a projection. The param tree
root is ``text_model/...`` (+ ``text_projection``), as the PyTorch state dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.models.layers import Dtype, dense, dot_product_attention, embed, layer_norm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set: CLIPTextModelWithProjection (SDXL's second encoder)
    bos_token_id: int = 0
    eos_token_id: int = 2  # 2 = transformers' legacy rule: pool at argmax(input_ids)
    pad_token_id: int = 1

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        return cls()

    @classmethod
    def sd21(cls) -> CLIPTextConfig:
        return cls(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
        )

    @classmethod
    def sdxl_l(cls) -> CLIPTextConfig:
        return cls()

    @classmethod
    def sdxl_g(cls) -> CLIPTextConfig:
        return cls(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
        )

    @classmethod
    def tiny(cls, **overrides) -> CLIPTextConfig:
        base = cls(vocab_size=1114, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> CLIPTextConfig:
        """A transformers ``CLIPTextConfig`` ``config.json``; ``architectures`` decides the projection.

        Missing keys take transformers' defaults. Bookkeeping keys are ignored.
        """
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise UnsupportedArchitectureError(
                f"text encoder config: architectures={arch!r} is not supported "
                "(expected CLIPTextModel or CLIPTextModelWithProjection)"
            )
        model_type = cfg.get("model_type", "clip_text_model")
        if model_type != "clip_text_model" or "text_config" in cfg:
            raise UnsupportedArchitectureError(
                f"text encoder config: model_type={model_type!r} is not supported; pass the text tower's own "
                "config (model_type 'clip_text_model'), not a full CLIP config"
            )
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"text encoder config: hidden_act={act!r} is not supported (one of {sorted(ACTIVATIONS)})"
            )
        return cls(
            vocab_size=cfg.get("vocab_size", 49408),
            hidden_size=cfg.get("hidden_size", 512),
            intermediate_size=cfg.get("intermediate_size", 2048),
            num_hidden_layers=cfg.get("num_hidden_layers", 12),
            num_attention_heads=cfg.get("num_attention_heads", 8),
            max_position_embeddings=cfg.get("max_position_embeddings", 77),
            hidden_act=act,
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
            projection_dim=cfg.get("projection_dim", 512) if arch == "CLIPTextModelWithProjection" else None,
            bos_token_id=cfg.get("bos_token_id", 49406),
            eos_token_id=cfg.get("eos_token_id", 49407),
            pad_token_id=cfg.get("pad_token_id", 1),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        arch = "CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"
        return {
            "architectures": [arch],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "projection_dim": self.projection_dim or 512,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
        }


class _Attn(nn.Module):
    """Holds ``q_proj``/``k_proj``/``v_proj``/``out_proj`` under ``self_attn``."""

    hidden_size: int
    heads: int
    causal: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.hidden_size
        q = dense(d, name="q_proj", axes=("embed", "heads"), **kw)(x)
        k = dense(d, name="k_proj", axes=("embed", "heads"), **kw)(x)
        v = dense(d, name="v_proj", axes=("embed", "heads"), **kw)(x)
        a = dot_product_attention(q, k, v, heads=self.heads, mask=mask, is_causal=self.causal)
        return dense(d, name="out_proj", axes=("heads", "embed"), **kw)(a.astype(self.dtype))


class _MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.act](dense(self.intermediate_size, name="fc1", **kw)(x))
        return dense(self.hidden_size, name="fc2", axes=("mlp", "embed"), **kw)(h)


class EncoderLayer(nn.Module):
    """transformers ``CLIPEncoderLayer``."""

    hidden_size: int
    intermediate_size: int
    heads: int
    act: str
    eps: float = 1e-5
    causal: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = dict(eps=self.eps, param_dtype=self.param_dtype)
        h = layer_norm(name="layer_norm1", **ln)(x).astype(self.dtype)
        x = x + _Attn(self.hidden_size, self.heads, self.causal, name="self_attn", **kw)(h, mask)
        h = layer_norm(name="layer_norm2", **ln)(x).astype(self.dtype)
        return x + _MLP(self.hidden_size, self.intermediate_size, self.act, name="mlp", **kw)(h)


class Encoder(nn.Module):
    """transformers ``CLIPEncoder``: returns every layer's output (``hidden_states[1:]``)."""

    config: Any
    causal: bool = True
    num_layers: int | None = None  # stop early (clip skip): later layers are neither run nor required
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        cfg = self.config
        outs = []
        n = cfg.num_hidden_layers if self.num_layers is None else self.num_layers
        for i in range(n):
            x = EncoderLayer(
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.hidden_act,
                eps=cfg.layer_norm_eps,
                causal=self.causal,
                name=f"layers_{i}",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(x, mask)
            outs.append(x)
        return outs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TextOutput:
    last_hidden_state: jax.Array  # after the final layer norm
    hidden_states: tuple  # embeddings, then each layer's output (before the final layer norm)
    pooler_output: jax.Array  # last_hidden_state at the EOS token
    text_embeds: jax.Array | None = None  # projected pooled output (with projection only)


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel`` (``CLIPTextModelWithProjection`` when ``config.projection_dim``).

    ``__call__(input_ids, attention_mask=None) -> TextOutput``. The mask is
    causal, as CLIP was trained; ``attention_mask`` additionally hides padding
    keys, as transformers does when one is passed. ``num_layers`` stops after
    that many layers (clip skip): ``last_hidden_state`` is then that layer's
    output through the final layer norm, as diffusers' ``clip_skip`` for SD 1.x.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    num_layers: int | None = None

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        pd = dict(param_dtype=self.param_dtype)
        tm = _TextTransformer(cfg, self.num_layers, name="text_model", dtype=self.dtype, **pd)
        last, hidden = tm(input_ids, attention_mask)
        if cfg.eos_token_id == 2:  # legacy configs: EOS is the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if cfg.projection_dim:
            proj = dense(cfg.projection_dim, use_bias=False, name="text_projection", dtype=self.dtype, **pd)
            text_embeds = proj(pooled.astype(self.dtype))
        return TextOutput(last, tuple(hidden), pooled, text_embeds)


class _TextTransformer(nn.Module):
    """transformers ``CLIPTextTransformer`` (``text_model``)."""

    config: CLIPTextConfig
    num_layers: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        pd = dict(param_dtype=self.param_dtype)
        t = input_ids.shape[-1]
        emb = _Embeddings(cfg, name="embeddings", **pd)(input_ids).astype(self.dtype)
        mask = None
        if attention_mask is not None:  # [B, T] -> [B, 1, 1, T] (padding keys hidden)
            mask = jnp.asarray(attention_mask, bool)[:, None, None, :t]
        layers = Encoder(cfg, num_layers=self.num_layers, name="encoder", dtype=self.dtype, **pd)(emb, mask)
        final = layer_norm(name="final_layer_norm", eps=cfg.layer_norm_eps, **pd)(layers[-1])
        return final.astype(self.dtype), [emb, *layers]


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tok = embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", param_dtype=self.param_dtype)
        pos = embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            name="position_embedding",
            axes=(None, "embed"),
            param_dtype=self.param_dtype,
        )
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids have {input_ids.shape[-1]} tokens but this text encoder has "
                f"max_position_embeddings={cfg.max_position_embeddings}; tokenize to that length"
            )
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


def abstract_params(config: CLIPTextConfig, param_dtype=jnp.float32):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    model = CLIPTextModel(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(lambda k: model.init(k, ids), jax.random.key(0))["params"])


def init_params(config: CLIPTextConfig, key, param_dtype=jnp.float32):
    model = CLIPTextModel(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return nn.meta.unbox(jax.jit(lambda k: model.init(k, ids))(key)["params"])
