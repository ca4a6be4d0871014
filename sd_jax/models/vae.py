"""diffusers ``AutoencoderKL`` as a Flax Linen module (NHWC), with its Gaussian posterior and tiling.

Images are in [-1, 1]; ``encode`` returns the posterior's mean and log-variance,
``decode`` maps latents back. Pipelines work with *scaled* latents
``(z - shift_factor) * scaling_factor`` (``encode_latents`` / ``decode_latents``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.models.layers import Dtype, ResnetBlock2D, conv, dense, dot_product_attention, group_norm
from sd_jax.models.unet_blocks import Downsample2D, Upsample2D


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd(cls) -> VAEConfig:
        return cls()

    @classmethod
    def sdxl(cls) -> VAEConfig:
        return cls(sample_size=1024, scaling_factor=0.13025)

    @classmethod
    def x4_upscaler(cls) -> VAEConfig:
        return cls(block_out_channels=(128, 256, 512), sample_size=256, scaling_factor=0.08333)

    @classmethod
    def tiny(cls, **overrides) -> VAEConfig:
        base = cls(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> VAEConfig:
        blocks = tuple(cfg.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for t in cfg.get(key, [want] * len(blocks)):
                if t != want:
                    raise UnsupportedArchitectureError(f"VAE config: {key} entry {t!r} is not supported (only {want})")
            if len(cfg.get(key, blocks)) != len(blocks):
                raise UnsupportedArchitectureError(f"VAE config: {key} and block_out_channels differ in length")
        if cfg.get("act_fn", "silu") != "silu":
            raise UnsupportedArchitectureError(f"VAE config: act_fn={cfg['act_fn']!r} is not supported")
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise UnsupportedArchitectureError("VAE config: latents_mean/latents_std normalization is not supported")
        sample = cfg.get("sample_size", 32)
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_out_channels=blocks,
            layers_per_block=cfg.get("layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            sample_size=sample[0] if isinstance(sample, (list, tuple)) else sample,
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            shift_factor=cfg.get("shift_factor"),
            force_upcast=cfg.get("force_upcast", True),
            mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "act_fn": "silu",
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "force_upcast": self.force_upcast,
            "mid_block_add_attention": self.mid_block_add_attention,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
        }


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block ``Attention``: group norm, one head over all channels, residual."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "xla"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axes=("embed", "heads"))
        y = group_norm(self.groups, eps=1e-6, name="group_norm", param_dtype=self.param_dtype)(x)
        y = y.astype(self.dtype).reshape(b, h * w, c)
        q, k, v = (dense(c, name=n, **kw)(y) for n in ("to_q", "to_k", "to_v"))
        a = dot_product_attention(q, k, v, heads=1, kernel=self.attention_kernel).astype(self.dtype)
        out = dense(c, name="to_out_0", dtype=self.dtype, param_dtype=self.param_dtype, axes=("heads", "embed"))(a)
        return out.reshape(b, h, w, c) + x


class MidBlock(nn.Module):
    """``UNetMidBlock2D`` without time embedding: resnet, attention, resnet."""

    channels: int
    groups: int
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_kernel: str = "xla"

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, eps=1e-6, temb=False, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, name="resnets_0", **kw)(x)
        if self.attention:
            x = SpatialSelfAttention(
                self.groups, self.dtype, self.param_dtype, self.attention_kernel, name="attentions_0"
            )(x)
        return ResnetBlock2D(self.channels, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    """diffusers ``Encoder`` (autoencoders/vae.py): conv_in, down blocks, mid block, norm, conv_out to moments."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # the mid block's attention kernel, resolved from config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rk = dict(groups=cfg.norm_num_groups, eps=1e-6, temb=False, **kw)
        x = conv(cfg.block_out_channels[0], name="conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(cfg.block_out_channels):
            blk = _Level(
                ch, cfg.layers_per_block, i < len(cfg.block_out_channels) - 1, rk, down=True, name=f"down_blocks_{i}"
            )
            x = blk(x)
        x = MidBlock(
            cfg.block_out_channels[-1],
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
            name="mid_block",
            attention_kernel=self.attention,
            **kw,
        )(x)
        x = group_norm(cfg.norm_num_groups, eps=1e-6, name="conv_norm_out", param_dtype=self.param_dtype)(x)
        return conv(2 * cfg.latent_channels, name="conv_out", **kw)(nn.silu(x).astype(self.dtype))


class Decoder(nn.Module):
    """diffusers ``Decoder`` (autoencoders/vae.py): conv_in, mid block, up blocks, norm, conv_out."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # the mid block's attention kernel, resolved from config

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rk = dict(groups=cfg.norm_num_groups, eps=1e-6, temb=False, **kw)
        x = conv(cfg.block_out_channels[-1], name="conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock(
            cfg.block_out_channels[-1],
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
            name="mid_block",
            attention_kernel=self.attention,
            **kw,
        )(x)
        rev = tuple(reversed(cfg.block_out_channels))
        for i, ch in enumerate(rev):
            x = _Level(ch, cfg.layers_per_block + 1, i < len(rev) - 1, rk, down=False, name=f"up_blocks_{i}")(x)
        x = group_norm(cfg.norm_num_groups, eps=1e-6, name="conv_norm_out", param_dtype=self.param_dtype)(x)
        return conv(cfg.out_channels, name="conv_out", **kw)(nn.silu(x).astype(self.dtype))


class _Level(nn.Module):
    """``DownEncoderBlock2D`` (down=True) or ``UpDecoderBlock2D``."""

    channels: int
    num_layers: int
    resample: bool
    resnet_kw: dict
    down: bool = True

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, name=f"resnets_{j}", **self.resnet_kw)(x)
        if self.resample:
            kw = dict(dtype=self.resnet_kw["dtype"], param_dtype=self.resnet_kw["param_dtype"])
            if self.down:  # diffusers pads (0, 1, 0, 1) and convolves with padding 0 here
                x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
            else:
                x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class AutoencoderKL(nn.Module):
    """``encode(x) -> (mean, logvar)``, ``decode(z) -> x``; both unscaled, as diffusers."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # the mid block's attention kernel, resolved from config

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, attention=self.attention, **kw)
        self.decoder = Decoder(cfg, attention=self.attention, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, kernel_size=1, name=None, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, kernel_size=1, name=None, **kw)

    def moments(self, x):
        m = self.encoder(x)
        return self.quant_conv(m) if self.config.use_quant_conv else m

    def encode(self, x):
        return split_moments(self.moments(x))

    def decode(self, z):
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


def split_moments(m):
    """``DiagonalGaussianDistribution``: mean and log-variance clipped to [-30, 20]."""
    mean, logvar = jnp.split(m.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DiagonalGaussian:
    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def mode(self):
        return self.mean

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self):
        """KL to the standard normal, summed over latent dims (diffusers ``DiagonalGaussianDistribution.kl``)."""
        return 0.5 * jnp.sum(self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


def encode_latents(model: AutoencoderKL, params, images, key=None):
    """[-1, 1] images -> scaled latents (posterior mode, or a sample when ``key`` is given)."""
    mean, logvar = model.apply({"params": params}, images, method=AutoencoderKL.encode)
    post = DiagonalGaussian(mean, logvar)
    z = post.mode() if key is None else post.sample(key)
    cfg = model.config
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def decode_latents(model: AutoencoderKL, params, latents):
    """Scaled latents -> [-1, 1] images (unclipped)."""
    cfg = model.config
    z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    return model.apply({"params": params}, z, method=AutoencoderKL.decode).astype(jnp.float32)


# -- tiling: diffusers' enable_tiling() semantics, one jitted call per tile shape --


def _blend(a, b, extent, axis):
    n = min(a.shape[axis], b.shape[axis], extent)
    if n <= 0:
        return b
    w = (np.arange(n, dtype=np.float32) / n).reshape([-1 if d == axis else 1 for d in range(b.ndim)])
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - n, a.shape[axis], axis=axis)
    b_head = jax.lax.slice_in_dim(b, 0, n, axis=axis)
    blended = a_tail * (1 - w) + b_head * w
    return jnp.concatenate([blended, jax.lax.slice_in_dim(b, n, b.shape[axis], axis=axis)], axis=axis)


# Params are an argument, not a closure: closed-over arrays would be baked into each
# compiled tile program as constants (~330 MB for the SD VAE). Edge tiles are smaller,
# as in diffusers, so at most four tile shapes compile.
@functools.partial(jax.jit, static_argnums=0)
def _moments_tile(model: AutoencoderKL, params, x):
    return model.apply({"params": params}, x, method=AutoencoderKL.moments).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _decode_tile(model: AutoencoderKL, params, z):
    return model.apply({"params": params}, z, method=AutoencoderKL.decode).astype(jnp.float32)


def _tiled(fn, x, tile_in: int, tile_out: int, overlap: float):
    """Run ``fn`` over overlapping ``tile_in`` tiles of NHWC ``x`` and blend the ``tile_out`` outputs."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    limit = tile_out - extent
    rows = []
    for i in range(0, x.shape[1], stride):
        row = []
        for j in range(0, x.shape[2], stride):
            tile = fn(x[:, i : i + tile_in, j : j + tile_in])
            if rows:
                tile = _blend(rows[-1][len(row)], tile, extent, axis=1)
            if row:
                tile = _blend(row[-1], tile, extent, axis=2)
            row.append(tile)
        rows.append(row)
    return jnp.concatenate([jnp.concatenate([t[:, :limit, :limit] for t in r], axis=2) for r in rows], axis=1)


def tiled_encode(model: AutoencoderKL, params, images, tile_size: int | None = None, overlap: float = 0.25):
    """``(mean, logvar)`` of large images, encoded tile by tile as diffusers' ``_tiled_encode``.

    ``tile_size`` is diffusers' ``tile_sample_min_size`` in pixels (default ``sample_size``);
    ``overlap`` is its ``tile_overlap_factor``. Equals ``vae.enable_tiling()`` output.
    """
    cfg = model.config
    tile = tile_size or cfg.sample_size
    fn = functools.partial(_moments_tile, model, params)
    return split_moments(_tiled(fn, images, tile, tile // cfg.downsample_factor, overlap))


def tiled_decode(model: AutoencoderKL, params, z, tile_size: int | None = None, overlap: float = 0.25):
    """Decode unscaled latents tile by tile (diffusers ``tiled_decode``); memory is bounded by the tile.

    ``tile_size`` is in pixels as in diffusers (latent tiles are ``tile_size / downsample_factor``).
    """
    cfg = model.config
    tile = tile_size or cfg.sample_size
    fn = functools.partial(_decode_tile, model, params)
    return _tiled(fn, z, tile // cfg.downsample_factor, tile, overlap)


def _dummy(config: VAEConfig):
    s = config.downsample_factor
    return jnp.zeros((1, s, s, config.in_channels))


def abstract_params(config: VAEConfig, param_dtype=jnp.float32):
    model = AutoencoderKL(config, param_dtype=param_dtype)
    return nn.meta.unbox(jax.eval_shape(lambda k: model.init(k, _dummy(config)), jax.random.key(0))["params"])


def init_params(config: VAEConfig, key, param_dtype=jnp.float32):
    """Random params distributed as ``model.init`` draws them (layers.py: lecun-normal kernels,
    zero biases, unit norm scales), but with one truncated-normal draw for all kernels: XLA
    compiles a separate RNG per leaf slowly on CPU (~20 s for the ~150 leaves of ``tiny()``)."""
    flat = traverse_util.flatten_dict(abstract_params(config, param_dtype))
    odd = sorted("/".join(p) for p in flat if p[-1] not in ("kernel", "bias", "scale"))
    if odd:
        raise ValueError(f"init_params: no initializer known for VAE params {odd}")
    kernels = [p for p in flat if p[-1] == "kernel"]
    sizes = [math.prod(flat[p].shape) for p in kernels]

    def init(key):
        draw = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
        out = {p: (jnp.ones if p[-1] == "scale" else jnp.zeros)(s.shape, s.dtype) for p, s in flat.items()}
        for p, start, n in zip(kernels, np.cumsum([0, *sizes[:-1]]), sizes, strict=True):
            shape = flat[p].shape  # fan_in is every axis but the last (HWI of HWIO, I of IO)
            std = math.sqrt(1.0 / math.prod(shape[:-1])) / 0.87962566103423978  # as variance_scaling
            out[p] = (draw[int(start) : int(start) + n].reshape(shape) * std).astype(flat[p].dtype)
        return traverse_util.unflatten_dict(out)

    return jax.jit(init)(key)
