"""Convolution algorithms, picked by name in config (as the attention kernels are): never decided inside a layer.

Each is a drop-in ``lax.conv_general_dilated`` for ``flax.linen.Conv(conv_general_dilated=...)``; only 3x3,
stride-1, padding-1, ungrouped NHWC convolutions (the resnets' and the samplers' convs) take another path,
everything else runs XLA's convolution:

- ``xla``: XLA's convolution (any backend; cuDNN on GPU, the MXU on TPU);
- ``im2col``: the nine shifted views concatenated along channels, then one ``[B*H*W, 9*C] x [9*C, C']`` matmul;
- ``shifted``: nine ``[B*H*W, C] x [C, C']`` matmuls over the shifted views, summed (no 9x copy);
- ``cpu``: per shape, by ``python -m bench.conv`` on this 2-core machine: ``im2col`` at 8x8 and below with >= 512
  input channels (SD 1.5's innermost level), ``xla`` elsewhere.

XLA:CPU's convolution runs SD 1.5's 3x3 convolutions at 190-320 GFLOP/s from 64x64 to 16x16, but at ~70 at 8x8
with 1280 or 2560 channels, where ``im2col`` reaches 240-300 (4x faster); ``shifted`` won nowhere in that run
(BENCHMARKS.md keeps the table). All three sum the same products in another order: they agree to float rounding
(tests/test_conv_kernels.py).
:func:`resolve` turns ``"auto"`` into ``cpu`` on the CPU and ``xla`` elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

KERNELS = ("xla", "im2col", "shifted", "cpu")
AUTO = {"cpu": "cpu"}
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # Flax's, for NHWC / HWIO


def resolve(name: str = "auto", backend: str | None = None) -> str:
    """``"auto"`` -> the algorithm for ``backend`` (default: JAX's default backend); a name is checked."""
    if name == "auto":
        return AUTO.get(backend or jax.default_backend(), "xla")
    if name not in KERNELS:
        raise ValueError(f"conv {name!r}: choose auto or one of {', '.join(KERNELS)}")
    return name


def _views(x):
    """The nine ``[B, H, W, C]`` views of ``x`` padded by one, in (ky, kx) order."""
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, ky : ky + h, kx : kx + w] for ky in range(3) for kx in range(3)]


def im2col(x, kernel, precision=None, preferred_element_type=None):
    cols = jnp.concatenate(_views(x), axis=-1)
    k = kernel.reshape(9 * kernel.shape[2], kernel.shape[3])
    return jnp.einsum("bhwk,kd->bhwd", cols, k, precision=precision, preferred_element_type=preferred_element_type)


def shifted(x, kernel, precision=None, preferred_element_type=None):
    out = None
    for (ky, kx), v in zip(((a, b) for a in range(3) for b in range(3)), _views(x)):
        y = jnp.einsum("bhwc,cd->bhwd", v, kernel[ky, kx], precision=precision,
                       preferred_element_type=preferred_element_type)  # fmt: skip
        out = y if out is None else out + y
    return out


def cpu_choice(h: int, w: int, cin: int) -> str:
    """The ``cpu`` rule: which algorithm a 3x3 convolution of an ``h x w x cin`` input takes."""
    return "im2col" if cin >= 512 and h * w <= 8 * 8 else "xla"


def _plain_3x3(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups) -> bool:
    pads = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    return (lhs.ndim == 4 and tuple(rhs.shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and pads == ((1, 1),) * 2
            and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
            and groups == 1 and dimension_numbers == _NHWC)  # fmt: skip


def get(name: str):
    """The ``conv_general_dilated`` of algorithm ``name`` (``None`` for ``xla``: Flax's own default)."""
    if name == "xla":
        return None
    if name not in KERNELS:
        raise ValueError(f"conv {name!r}: use one of {', '.join(KERNELS)} (resolve 'auto' in config)")

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, precision=None,
                             preferred_element_type=None, **kw):  # fmt: skip
        if _plain_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count) and not kw:  # fmt: skip
            algo = cpu_choice(lhs.shape[1], lhs.shape[2], lhs.shape[3]) if name == "cpu" else name
            if algo != "xla":
                return {"im2col": im2col, "shifted": shifted}[algo](lhs, rhs, precision, preferred_element_type)
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type, **kw)  # fmt: skip

    conv_general_dilated.__name__ = f"conv_{name}"
    return conv_general_dilated
