"""The U-Net's down, mid and up blocks (diffusers ``unets/unet_2d_blocks.py``).

One class serves the plain and the cross-attention variant of each level:
``has_attention=False`` is diffusers' ``DownBlock2D`` / ``UpBlock2D``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.attention import Transformer2DModel
from sd_jax.models.layers import Dtype, ResnetBlock2D, conv


def upsample_nearest(x, size):
    """``F.interpolate(mode="nearest", size=size)`` in NHWC: source index ``floor(i * in / out)``."""
    _, h, w, _ = x.shape
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D`` (use_conv=True): a stride-2 conv."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: str = "xla"  # the convolution algorithm, resolved from config

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:  # diffusers pads (0, 1, 0, 1) by hand in this case
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, stride=2, padding=self.padding, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel=self.conv)(x)  # fmt: skip


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D`` (use_conv=True): nearest-neighbour resize, then a conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: str = "xla"  # the convolution algorithm, resolved from config

    @nn.compact
    def __call__(self, x, size=None):
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = upsample_nearest(x, size)
        return conv(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype, kernel=self.conv)(x)


class _BlockOptions(nn.Module):
    """Fields shared by every block (not instantiated itself)."""

    out_channels: int
    num_layers: int
    has_attention: bool = True
    heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    groups: int = 32
    eps: float = 1e-5
    query_chunk_size: int | None = None
    attention: str = "xla"  # the attention kernel, resolved from config
    conv: str = "xla"  # the convolution algorithm, resolved from config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, name, out=None, scale=1.0):
        return ResnetBlock2D(
            out or self.out_channels,
            groups=self.groups,
            eps=self.eps,
            output_scale_factor=scale,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv=self.conv,
            name=name,
        )

    def transformer(self, name):
        return Transformer2DModel(
            self.heads,
            self.out_channels // self.heads,
            num_layers=self.transformer_layers,
            norm_num_groups=self.groups,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast=self.upcast_attention,
            query_chunk_size=self.query_chunk_size,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class DownBlock(_BlockOptions):
    """``CrossAttnDownBlock2D`` (or ``DownBlock2D`` without attention); returns (h, skips)."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels,
                padding=self.downsample_padding,
                conv=self.conv,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_BlockOptions):
    """``UNetMidBlock2DCrossAttn``: resnet, (transformer, resnet) x num_layers."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0", scale=self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}", scale=self.output_scale_factor)(x, temb)
        return x


class UpBlock(_BlockOptions):
    """``CrossAttnUpBlock2D`` (or ``UpBlock2D``): each resnet eats one skip connection."""

    add_upsample: bool = True
    upsample_size: tuple[int, int] | None = None  # static, so remat needs no static_argnums

    @nn.compact
    def __call__(self, x, skips: Sequence, temb, context):
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, conv=self.conv,
                           name="upsamplers_0")(x, self.upsample_size)  # fmt: skip
        return x
