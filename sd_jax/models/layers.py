"""Building blocks shared by the CLIP, VAE and U-Net modules.

Parameter names follow the PyTorch modules of diffusers/transformers, so that a
PyTorch key such as ``down_blocks.0.resnets.1.conv1.weight`` is the Flax path
``down_blocks_0/resnets_1/conv1/kernel`` (see ``sd_jax.convert.diffusers``).

Every weight carries logical axis names (``embed``, ``mlp``, ``heads``,
``conv_in``, ``conv_out``, ``norm``, ``vocab``); mesh axes appear only in
``sd_jax.sharding`` rules. Norms and softmax run in float32 whatever the
activation dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models import attention_kernels, conv_kernels

Dtype = Any

_default_kernel_init = nn.initializers.lecun_normal()


def logical(init, axes: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(features, *, name, use_bias=True, axes=("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32):
    """A flat ``nn.Dense`` (params directly under ``name``) with logical axes."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(_default_kernel_init, axes),
        bias_init=logical(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def conv(features, *, name, kernel_size=3, stride=1, padding=None, dtype=jnp.float32, param_dtype=jnp.float32,
         kernel: str = "xla"):  # fmt: skip
    """``torch.nn.Conv2d`` in NHWC: kernel (kh, kw, in, out), symmetric padding like PyTorch. ``kernel`` names the
    convolution algorithm (:mod:`sd_jax.models.conv_kernels`), resolved from config."""
    if padding is None:
        padding = kernel_size // 2
    return nn.Conv(
        features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(_default_kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)),
        conv_general_dilated=conv_kernels.get(kernel),
        name=name,
    )


def group_norm(num_groups, *, name, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
    """``torch.nn.GroupNorm``; statistics in float32."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones_init(), ("norm",)),
        bias_init=logical(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(*, name, eps=1e-5, param_dtype=jnp.float32):
    """``torch.nn.LayerNorm``; computed in float32 (callers cast the result)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones_init(), ("norm",)),
        bias_init=logical(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def embed(num, features, *, name, axes=("vocab", "embed"), param_dtype=jnp.float32):
    """``torch.nn.Embedding``; the table is the ``embedding`` param."""
    return nn.Embed(
        num,
        features,
        param_dtype=param_dtype,
        embedding_init=logical(nn.initializers.normal(0.02), axes),
        name=name,
    )


def dot_product_attention(q, k, v, *, heads: int, mask=None, is_causal=False, query_chunk_size: int | None = None,
                          kernel: str = "xla"):  # fmt: skip
    """Multi-head attention on ``[B, T, C]`` projections; returns ``[B, Tq, C]``.

    ``kernel`` names the attention kernel (:mod:`sd_jax.models.attention_kernels`: ``xla``, ``blocked``,
    ``cudnn``, ``flash``), resolved from config before the module is built; logits and softmax run in float32.
    With ``query_chunk_size`` the queries are processed in chunks under ``lax.map`` so the score matrix never
    exceeds ``chunk x Tk`` (memory-bounded attention for large latents, as in Rabe & Staats 2021).
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    hd = c // heads
    q = q.reshape(b, tq, heads, hd)
    k = k.reshape(b, tk, heads, hd)
    v = v.reshape(b, tk, heads, hd)
    attn = functools.partial(attention_kernels.attend, kernel=kernel, is_causal=is_causal)
    if query_chunk_size is None or query_chunk_size >= tq or tq % query_chunk_size:
        out = attn(q, k, v, mask=mask)
    else:
        if mask is not None:
            raise ValueError("query_chunk_size does not support an explicit mask")
        n = tq // query_chunk_size
        qc = q.reshape(b, n, query_chunk_size, heads, hd).swapaxes(0, 1)
        out = jax.lax.map(lambda qq: attn(qq, k, v), qc)
        out = out.swapaxes(0, 1).reshape(b, tq, heads, hd)
    return out.reshape(b, tq, c)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (time_embedding_norm="default")."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    temb: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: str = "xla"  # the convolution algorithm (sd_jax.models.conv_kernels), resolved from config

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.groups, eps=self.eps, name="norm1", param_dtype=self.param_dtype)(x)
        h = nn.silu(h).astype(self.dtype)
        h = conv(self.out_channels, name="conv1", kernel=self.conv, **kw)(h)
        if self.temb and temb is not None:
            t = dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups, eps=self.eps, name="norm2", param_dtype=self.param_dtype)(h)
        h = nn.silu(h).astype(self.dtype)
        h = conv(self.out_channels, name="conv2", kernel=self.conv, **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, kernel_size=1, name="conv_shortcut", **kw)(x)
        return ((x + h) / self.output_scale_factor).astype(self.dtype)
