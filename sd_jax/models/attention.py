"""The U-Net's spatial transformer: diffusers ``Transformer2DModel`` and its parts.

Names mirror diffusers (``attention.py``, ``attention_processor.py``,
``transformers/transformer_2d.py``) so checkpoints map one to one.

IP-Adapter (Ye et al. 2023, decoupled cross-attention; diffusers ``IPAdapterAttnProcessor2_0``): the U-Net's
``context`` may be a tuple ``(text, ip)`` with ``ip`` a tuple of ``(tokens [B, T, D], scale)`` per adapter
(``scale`` a scalar or ``[B]``, traced). Self-attention ignores the image tokens; each cross-attention adds
``scale * attention(q, to_k_ip_i(tokens), to_v_ip_i(tokens))`` before ``to_out``. The adapter's parameters
(``attn2/processor/to_k_ip_<i>``, ``to_v_ip_<i>``) only exist when image tokens are passed, so the plain
U-Net's parameter tree is unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.layers import Dtype, conv, dense, dot_product_attention, group_norm, layer_norm


class Attention(nn.Module):
    """diffusers ``Attention`` (AttnProcessor2_0): q/k/v without bias, ``to_out.0`` with bias."""

    heads: int
    dim_head: int
    query_dim: int
    upcast: bool = False
    query_chunk_size: int | None = None
    attention: str = "xla"  # the kernel (sd_jax.models.attention_kernels), resolved from config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, ip=None):
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        q = dense(inner, use_bias=False, name="to_q", axes=("embed", "heads"), **kw)(x)
        k = dense(inner, use_bias=False, name="to_k", axes=("embed", "heads"), **kw)(context)
        v = dense(inner, use_bias=False, name="to_v", axes=("embed", "heads"), **kw)(context)
        if self.upcast:  # SD 2.x: the scores of fp16/bf16 runs overflow without this
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            v = v.astype(jnp.float32)
        out = dot_product_attention(
            q, k, v, heads=self.heads, query_chunk_size=self.query_chunk_size, kernel=self.attention
        )
        if ip:
            ipa = IPAdapterProcessor(self.heads, inner, self.query_chunk_size, self.attention, name="processor", **kw)
            out = out + ipa(q, ip)
        out = out.astype(self.dtype)
        return dense(self.query_dim, name="to_out_0", axes=("heads", "embed"), **kw)(out)


class IPAdapterProcessor(nn.Module):
    """The image branch of diffusers ``IPAdapterAttnProcessor2_0``: ``sum_i scale_i * attn(q, to_k_ip_i, to_v_ip_i)``.

    Parameters ``to_k_ip_<i>`` / ``to_v_ip_<i>`` (no bias) map the PyTorch ``processor.to_k_ip.<i>.weight``.
    """

    heads: int
    inner: int
    query_chunk_size: int | None = None
    attention: str = "xla"  # the kernel (sd_jax.models.attention_kernels), resolved from config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, ip):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        total = 0.0
        for i, (tokens, scale) in enumerate(ip):
            tokens = tokens.astype(self.dtype)
            k = dense(self.inner, use_bias=False, name=f"to_k_ip_{i}", axes=("embed", "heads"), **kw)(tokens)
            v = dense(self.inner, use_bias=False, name=f"to_v_ip_{i}", axes=("embed", "heads"), **kw)(tokens)
            k, v = k.astype(q.dtype), v.astype(q.dtype)  # float32 under upcast, as the text branch
            a = dot_product_attention(
                q, k, v, heads=self.heads, query_chunk_size=self.query_chunk_size, kernel=self.attention
            )
            s = jnp.asarray(scale, a.dtype)
            total = total + s.reshape(s.shape + (1,) * (a.ndim - s.ndim)) * a
        return total


def split_context(context):
    """``(text, ip or None)`` of a context that may carry IP-Adapter image tokens."""
    return context if isinstance(context, tuple) else (context, None)


class GEGLU(nn.Module):
    """diffusers ``GEGLU``: ``proj`` to twice the width, then ``h * gelu(gate)`` (exact gelu)."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(2 * self.inner, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net.0`` (GEGLU), ``net.2`` (Linear)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
        return dense(self.dim, name="net_2", axes=("mlp", "embed"), **kw)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock``: self-attn, cross-attn, GEGLU feed-forward, pre-LayerNorm.

    With ``only_cross_attention`` (x4 upscaler) the first attention also attends
    to the text, as in diffusers.
    """

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast: bool = False
    query_chunk_size: int | None = None
    attention: str = "xla"  # the kernel (sd_jax.models.attention_kernels), resolved from config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        attn = dict(
            heads=self.heads,
            dim_head=self.dim_head,
            query_dim=self.dim,
            upcast=self.upcast,
            query_chunk_size=self.query_chunk_size,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

        def ln(name, h):
            return layer_norm(name=name, param_dtype=self.param_dtype)(h).astype(self.dtype)

        text, ip = split_context(context)
        x = x + Attention(name="attn1", **attn)(ln("norm1", x), text if self.only_cross_attention else None)
        x = x + Attention(name="attn2", **attn)(ln("norm2", x), text, ip)
        x = x + FeedForward(self.dim, name="ff", dtype=self.dtype, param_dtype=self.param_dtype)(ln("norm3", x))
        return x


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` for continuous (NHWC) inputs."""

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast: bool = False
    query_chunk_size: int | None = None
    attention: str = "xla"  # the kernel (sd_jax.models.attention_kernels), resolved from config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        y = group_norm(self.norm_num_groups, eps=1e-6, name="norm", param_dtype=self.param_dtype)(x).astype(self.dtype)
        if self.use_linear_projection:
            y = dense(inner, name="proj_in", **kw)(y.reshape(b, h * w, c))
        else:
            y = conv(inner, kernel_size=1, name="proj_in", **kw)(y).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                only_cross_attention=self.only_cross_attention,
                upcast=self.upcast,
                query_chunk_size=self.query_chunk_size,
                attention=self.attention,
                name=f"transformer_blocks_{i}",
                **kw,
            )(y, context)
        if self.use_linear_projection:
            y = dense(c, name="proj_out", **kw)(y).reshape(b, h, w, c)
        else:
            y = conv(c, kernel_size=1, name="proj_out", **kw)(y.reshape(b, h, w, inner))
        return y + residual
