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


def conv(features, *, name, kernel_size=3, stride=1, padding=None, dtype=jnp.float32, param_dtype=jnp.float32):
    """``torch.nn.Conv2d`` in NHWC: kernel (kh, kw, in, out), symmetric padding like PyTorch."""
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


def dot_product_attention(q, k, v, *, heads: int, mask=None, is_causal=False, query_chunk_size: int | None = None):
    """Multi-head attention on ``[B, T, C]`` projections; returns ``[B, Tq, C]``.

    Goes through ``jax.nn.dot_product_attention`` so XLA (or cuDNN on GPU) can
    pick a fused kernel; its logits and softmax run in float32. With
    ``query_chunk_size`` the queries are processed in chunks under ``lax.map``
    so the score matrix never exceeds ``chunk x Tk`` (memory-bounded attention
    for large latents, as in Rabe & Staats 2021).
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    hd = c // heads
    q = q.reshape(b, tq, heads, hd)
    k = k.reshape(b, tk, heads, hd)
    v = v.reshape(b, tk, heads, hd)
    attn = functools.partial(_cpu_attention if jax.default_backend() == "cpu" else jax.nn.dot_product_attention,
                             is_causal=is_causal)  # fmt: skip
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


_CPU_SCORE_BLOCK = 1 << 22  # scores per step of the blocked CPU path (16 MiB of fp32, cache-sized)


def _cpu_attention(q, k, v, mask=None, *, is_causal=False):
    """``jax.nn.dot_product_attention`` as two einsums around an fp32 softmax, on ``[B, T, N, H]``.

    Same numbers (fp32 logits, scale after the product). XLA:CPU is bound by memory traffic on the full
    ``[B, N, Tq, Tk]`` score tensor (1 GiB for SD 1.5 at 64x64 latents), so large unmasked attention runs
    head by head and in query blocks of ``_CPU_SCORE_BLOCK`` scores under ``lax.map``: the SD 1.5 64x64
    self-attention (2 x 4096 tokens, 8 heads of 40) takes 0.41 s that way, 1.0 s in one piece and 1.77 s
    through the library's XLA path (``python -m bench.profile --full`` shows where the step's time goes).
    """
    b, tq, n, hd = q.shape
    tk = k.shape[1]
    block = _query_block(b, tq, tk)
    if mask is None and not is_causal and block:
        qs = q.reshape(b, tq // block, block, n, hd).transpose(3, 1, 0, 2, 4)  # [N, chunks, B, block, H]

        def head(args):  # one head: [chunks, B, block, H] queries, [B, Tk, H] keys and values
            qh, kh, vh = args

            def chunk(qb):
                logits = jnp.einsum("bqh,bkh->bqk", qb, kh, preferred_element_type=jnp.float32) * (hd**-0.5)
                return jnp.einsum("bqk,bkh->bqh", jax.nn.softmax(logits, axis=-1).astype(vh.dtype), vh)

            return jax.lax.map(chunk, qh)

        out = jax.lax.map(head, (qs, k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)))
        return out.transpose(2, 1, 3, 0, 4).reshape(b, tq, n, hd)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * (hd**-0.5)
    keep = None
    if is_causal:
        keep = jnp.tril(jnp.ones((tq, tk), bool), tk - tq)[None, None]
    if mask is not None:
        keep = mask if keep is None else keep & mask
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)


def _query_block(b: int, tq: int, tk: int) -> int:
    """Query block for the blocked CPU path: the largest power of two dividing ``tq`` with at most
    ``_CPU_SCORE_BLOCK`` scores per step; 0 when the scores are small enough to take in one piece."""
    if tq * tk * b < 4 * _CPU_SCORE_BLOCK:
        return 0
    block = tq & -tq
    while block > 1 and b * block * tk > _CPU_SCORE_BLOCK:
        block //= 2
    return block if 32 <= block < tq else 0


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (time_embedding_norm="default")."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    temb: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.groups, eps=self.eps, name="norm1", param_dtype=self.param_dtype)(x)
        h = nn.silu(h).astype(self.dtype)
        h = conv(self.out_channels, name="conv1", **kw)(h)
        if self.temb and temb is not None:
            t = dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups, eps=self.eps, name="norm2", param_dtype=self.param_dtype)(h)
        h = nn.silu(h).astype(self.dtype)
        h = conv(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, kernel_size=1, name="conv_shortcut", **kw)(x)
        return ((x + h) / self.output_scale_factor).astype(self.dtype)
