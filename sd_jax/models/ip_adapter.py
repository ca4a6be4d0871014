"""IP-Adapter image projections (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter").

:class:`ImageProjection` is diffusers ``ImageProjection`` (plain IP-Adapter: CLIP ``image_embeds`` -> linear ->
``num_tokens`` tokens -> LayerNorm); :class:`Resampler` is ``IPAdapterPlusImageProjection`` (IP-Adapter Plus: a
perceiver resampler over the CLIP penultimate hidden states). Parameter names follow the original h94 files
(``image_proj.proj``, ``image_proj.layers.<i>.0.to_kv``, ``image_proj.layers.<i>.1.1`` ...), so those files load
strictly through :func:`sd_jax.convert.diffusers.load_torch_state_dict`. The adapter's attention weights live in
the U-Net (:class:`sd_jax.models.attention.IPAdapterProcessor`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.models.layers import Dtype, dense, dot_product_attention, layer_norm

DIM_HEAD = 64  # diffusers and the original Resampler: heads = to_q rows // 64
DEPTH = 4  # diffusers builds IPAdapterPlusImageProjection with its default depth


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig:
    """What an IP-Adapter file implies, read from its ``image_proj`` shapes as diffusers does."""

    plus: bool  # True: Resampler over hidden_states[-2]; False: linear over image_embeds
    image_embed_dim: int  # CLIP projection_dim (plain) or hidden_size (plus)
    cross_attention_dim: int
    num_tokens: int = 4
    hidden_dims: int = 0  # plus only
    heads: int = 0  # plus only
    depth: int = DEPTH

    @classmethod
    def from_state_dict(cls, image_proj: Mapping[str, np.ndarray], source: str) -> IPAdapterConfig:
        """``image_proj`` keys without their ``image_proj.`` prefix."""
        shape = lambda k: tuple(np.shape(image_proj[k]))  # noqa: E731
        if "proj.weight" in image_proj:
            out, embed_dim = shape("proj.weight")
            return cls(plus=False, image_embed_dim=embed_dim, cross_attention_dim=out // 4, num_tokens=4)
        if "latents" in image_proj and "proj_in.weight" in image_proj:
            _, n, hidden = shape("latents")
            depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
            if depth != DEPTH:
                raise UnsupportedArchitectureError(
                    f"{source}: the resampler has {depth} layers; diffusers takes {DEPTH}"
                )
            return cls(
                plus=True, image_embed_dim=shape("proj_in.weight")[1], cross_attention_dim=shape("proj_out.weight")[0],
                num_tokens=n, hidden_dims=hidden, heads=shape("layers.0.0.to_q.weight")[0] // DIM_HEAD,
            )  # fmt: skip
        kind = "Full Face" if "proj.3.weight" in image_proj else "FaceID" if "norm.weight" in image_proj else None
        raise UnsupportedArchitectureError(
            f"{source}: image_proj is not an IP-Adapter or IP-Adapter Plus projection"
            + (f" (IP-Adapter {kind} is not supported)" if kind else f" (keys {sorted(image_proj)[:6]})")
        )


class ImageProjection(nn.Module):
    """``image_embeds [B, D] -> [B, num_tokens, cross_attention_dim]``."""

    config: IPAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeds):
        cfg = self.config
        x = dense(cfg.num_tokens * cfg.cross_attention_dim, name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(image_embeds.astype(self.dtype))  # fmt: skip
        x = x.reshape(x.shape[0], cfg.num_tokens, cfg.cross_attention_dim)
        return layer_norm(name="norm", param_dtype=self.param_dtype)(x).astype(self.dtype)


class PerceiverAttention(nn.Module):
    """The resampler's attention: latents attend to ``[LN(x); LN(latents)]``; ``to_kv`` is k and v stacked."""

    heads: int
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, latents):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * DIM_HEAD
        x = layer_norm(name="norm1", param_dtype=self.param_dtype)(x).astype(self.dtype)
        latents = layer_norm(name="norm2", param_dtype=self.param_dtype)(latents).astype(self.dtype)
        q = dense(inner, use_bias=False, name="to_q", **kw)(latents)
        kv = dense(2 * inner, use_bias=False, name="to_kv", **kw)(jnp.concatenate([x, latents], axis=1))
        k, v = jnp.split(kv, 2, axis=-1)
        out = dot_product_attention(q, k, v, heads=self.heads).astype(self.dtype)
        return dense(self.dim, use_bias=False, name="to_out", **kw)(out)


class Resampler(nn.Module):
    """``hidden_states[-2] [B, T, D] -> [B, num_tokens, cross_attention_dim]`` (IP-Adapter Plus)."""

    config: IPAdapterConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = lambda k, s, d: jax.random.normal(k, s, d) / cfg.hidden_dims**0.5  # noqa: E731
        latents = self.param("latents", init, (1, cfg.num_tokens, cfg.hidden_dims), self.param_dtype)
        latents = jnp.broadcast_to(latents, (x.shape[0], *latents.shape[1:])).astype(self.dtype)
        x = dense(cfg.hidden_dims, name="proj_in", **kw)(x.astype(self.dtype))
        for i in range(cfg.depth):
            latents = latents + PerceiverAttention(cfg.heads, cfg.hidden_dims, name=f"layers_{i}_0", **kw)(x, latents)
            h = layer_norm(name=f"layers_{i}_1_0", param_dtype=self.param_dtype)(latents).astype(self.dtype)
            h = dense(4 * cfg.hidden_dims, use_bias=False, name=f"layers_{i}_1_1", **kw)(h)
            h = dense(cfg.hidden_dims, use_bias=False, name=f"layers_{i}_1_3", **kw)(nn.gelu(h, approximate=False))
            latents = latents + h
        out = dense(cfg.cross_attention_dim, name="proj_out", **kw)(latents)
        return layer_norm(name="norm_out", param_dtype=self.param_dtype)(out).astype(self.dtype)


def projection(config: IPAdapterConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    return (Resampler if config.plus else ImageProjection)(config, dtype=dtype, param_dtype=param_dtype)


def abstract_params(config: IPAdapterConfig, param_dtype=jnp.float32):
    """The ``image_proj`` parameter tree as ``jax.ShapeDtypeStruct`` leaves."""
    x = jnp.zeros((1, 2, config.image_embed_dim)) if config.plus else jnp.zeros((1, config.image_embed_dim))
    model = projection(config, param_dtype=param_dtype)
    return nn.meta.unbox(jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))["params"])
