"""Attention kernels, one per backend, picked by name in config: never decided inside a layer.

Every kernel takes ``[B, T, N, H]`` queries, keys and values and returns ``[B, Tq, N, H]``, with float32 logits
and softmax and the ``H ** -0.5`` scale (the numbers of ``torch.nn.functional.scaled_dot_product_attention``):

- ``xla``: ``jax.nn.dot_product_attention`` with XLA's own lowering (any backend);
- ``blocked``: two einsums around an fp32 softmax, head by head and in query blocks for large unmasked attention
  (XLA:CPU is bound by memory traffic on the full score tensor);
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's flash attention (GPU);
- ``flash``: the Pallas TPU flash-attention kernel of ``jax.experimental.pallas.ops.tpu``; sequences are padded
  to its blocks and the padded keys masked with segment ids.

A kernel that cannot take a call (cuDNN: fp32 inputs, head sizes over 128 such as the VAE's 512, an explicit
mask; flash: an explicit mask) runs that call on the XLA path instead: the choice is per shape, stated here.
:func:`resolve` turns ``"auto"`` into the backend's kernel; configs (``StableDiffusion.load(attention=...)``,
``sample.py --attention``, ``config.attention`` in training) call it, and modules receive the resolved name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KERNELS = ("xla", "blocked", "cudnn", "flash")
AUTO = {"cpu": "blocked", "gpu": "cudnn", "cuda": "cudnn", "tpu": "flash"}

_CPU_SCORE_BLOCK = 1 << 22  # scores per step of the blocked path (16 MiB of fp32, cache-sized)
_FLASH_BLOCK = 128


def resolve(name: str = "auto", backend: str | None = None) -> str:
    """``"auto"`` -> the kernel for ``backend`` (default: JAX's default backend); a kernel name is checked."""
    if name == "auto":
        return AUTO.get(backend or jax.default_backend(), "xla")
    if name not in KERNELS:
        raise ValueError(f"attention {name!r}: choose auto or one of {', '.join(KERNELS)}")
    return name


def attend(q, k, v, *, kernel: str = "xla", mask=None, is_causal: bool = False):
    """Attention on ``[B, T, N, H]`` with the named kernel (see the module docstring)."""
    if kernel == "blocked":
        return _blocked(q, k, v, mask, is_causal=is_causal)
    if kernel == "cudnn" and _cudnn_takes(q, mask):
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    if kernel == "flash" and mask is None:
        return _flash(q, k, v, is_causal=is_causal)
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


def _cudnn_takes(q, mask) -> bool:
    """cuDNN's fused attention: fp16/bf16 inputs, head sizes up to 128 in multiples of 8, no explicit mask."""
    hd = q.shape[-1]
    return q.dtype in (jnp.float16, jnp.bfloat16) and hd <= 128 and hd % 8 == 0 and mask is None


def _flash(q, k, v, *, is_causal: bool):
    """The Pallas TPU kernel on ``[B, N, T, H]``: queries and keys padded to its block, padded keys masked."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, tq, n, hd = q.shape
    tk = k.shape[1]
    pq, pk = -tq % _FLASH_BLOCK, -tk % _FLASH_BLOCK

    def heads_first(x, pad):
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    seg = None
    if pk or pq:
        kv = jnp.concatenate([jnp.ones((b, tk), jnp.int32), jnp.zeros((b, pk), jnp.int32)], axis=1)
        seg = fa.SegmentIds(q=jnp.ones((b, tq + pq), jnp.int32), kv=kv)
    sizes = fa.BlockSizes(block_q=_FLASH_BLOCK, block_k_major=_FLASH_BLOCK, block_k=_FLASH_BLOCK, block_b=1,
                          block_q_major_dkv=_FLASH_BLOCK, block_k_major_dkv=_FLASH_BLOCK, block_k_dkv=_FLASH_BLOCK,
                          block_q_dkv=_FLASH_BLOCK, block_k_major_dq=_FLASH_BLOCK, block_k_dq=_FLASH_BLOCK,
                          block_q_dq=_FLASH_BLOCK)  # fmt: skip
    call = functools.partial(fa.flash_attention, segment_ids=seg, causal=is_causal, sm_scale=hd**-0.5,
                             block_sizes=sizes)  # fmt: skip
    args = (heads_first(q, pq), heads_first(k, pk), heads_first(v, pk))
    out = call(*args)  # on the CPU (tests): under pltpu.set_tpu_interpret_mode(), Pallas's TPU interpreter
    return out.transpose(0, 2, 1, 3)[:, :tq].astype(q.dtype)


def _blocked(q, k, v, mask=None, *, is_causal=False):
    """Two einsums around an fp32 softmax. Large unmasked attention runs head by head and in query blocks of
    ``_CPU_SCORE_BLOCK`` scores under ``lax.map``, each block rematerialized in the backward pass (so training
    holds one block's scores, as a flash kernel would, not the whole score tensor). The SD 1.5 64x64
    self-attention (2 x 4096 tokens, 8 heads of 40) takes 0.41 s that way on this 2-core CPU, 1.0 s in one piece
    and 1.77 s through the XLA path (``python -m bench.profile --full`` shows where the step's time goes)."""
    b, tq, n, hd = q.shape
    tk = k.shape[1]
    block = _query_block(b, tq, tk)
    if mask is None and not is_causal and block:
        qs = q.reshape(b, tq // block, block, n, hd).transpose(3, 1, 0, 2, 4)  # [N, chunks, B, block, H]

        def head(args):  # one head: [chunks, B, block, H] queries, [B, Tk, H] keys and values
            qh, kh, vh = args

            @jax.checkpoint  # the backward pass recomputes a block's scores: never all blocks' at once
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
    """Query block for the blocked path: the largest power of two dividing ``tq`` with at most
    ``_CPU_SCORE_BLOCK`` scores per step; 0 when the scores are small enough to take in one piece."""
    if tq * tk * b < 4 * _CPU_SCORE_BLOCK:
        return 0
    block = tq & -tq
    while block > 1 and b * block * tk > _CPU_SCORE_BLOCK:
        block //= 2
    return block if 32 <= block < tq else 0
