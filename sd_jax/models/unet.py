"""diffusers ``UNet2DConditionModel`` as a Flax Linen module, NHWC.

Covers SD 1.x, SD 2.x (linear projection, per-block heads, upcast attention),
SDXL (per-block transformer depth, ``text_time`` added conditioning), the
9-channel inpainting U-Net and the x4 upscaler (7 input channels, noise level
through a class embedding, ``only_cross_attention``). LCM-distilled U-Nets with
``time_cond_proj_dim`` are covered too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.models.layers import Dtype, conv, group_norm
from sd_jax.models.unet_blocks import UpBlock
from sd_jax.models.unet_encoder import DOWN_TYPES as _DOWN
from sd_jax.models.unet_encoder import (
    block_options,
    down_and_mid,
    remat,
    time_conditioning,
)

_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def _per_block(value, n, key):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedArchitectureError(f"UNet config: {key}={value!r} needs {n} entries, one per block")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a ``UNet2DConditionModel``; per-block fields are tuples over the down blocks."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    # Number of heads per block. diffusers calls this ``attention_head_dim`` for history's sake.
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    has_mid_block: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    num_class_embeds: int | None = None  # x4 upscaler: noise level as a class label
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None  # LCM-distilled U-Nets

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    # -- named variants (the real checkpoints' architectures) --
    @classmethod
    def sd15(cls) -> UNetConfig:
        return cls()

    @classmethod
    def sd15_inpaint(cls) -> UNetConfig:
        return dataclasses.replace(cls(), in_channels=9)

    @classmethod
    def sd21(cls) -> UNetConfig:
        return dataclasses.replace(
            cls(),
            sample_size=96,
            attention_heads=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            upcast_attention=True,
        )

    @classmethod
    def sdxl(cls) -> UNetConfig:
        return cls(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=(2, 2, 2),
            attention_heads=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            only_cross_attention=(False,) * 3,
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )

    @classmethod
    def x4_upscaler(cls) -> UNetConfig:
        return cls(
            in_channels=7,
            sample_size=128,
            block_out_channels=(256, 512, 512, 1024),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
            attention_heads=(8, 8, 8, 8),
            only_cross_attention=(True, True, True, False),
            cross_attention_dim=1024,
            use_linear_projection=True,
            num_class_embeds=1000,
        )

    @classmethod
    def tiny(cls, **overrides) -> UNetConfig:
        base = cls(
            sample_size=16,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=(1, 1),
            attention_heads=(2, 2),
            transformer_layers_per_block=(1, 1),
            only_cross_attention=(False, False),
            cross_attention_dim=32,
        )
        return dataclasses.replace(base, **overrides)

    # -- diffusers config.json --
    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> UNetConfig:
        def check(key, ok, default=None):
            value = cfg.get(key, default)
            if not ok(value):
                raise UnsupportedArchitectureError(f"UNet config: {key}={value!r} is not supported")
            return value

        check("center_input_sample", lambda v: not v, False)
        check("act_fn", lambda v: v == "silu", "silu")
        check("mid_block_type", lambda v: v in ("UNetMidBlock2DCrossAttn", None), "UNetMidBlock2DCrossAttn")
        check("class_embed_type", lambda v: v is None, None)
        check("addition_embed_type", lambda v: v in (None, "text_time"), None)
        check("time_embedding_type", lambda v: v == "positional", "positional")
        check("time_embedding_act_fn", lambda v: v is None, None)
        check("timestep_post_act", lambda v: v is None, None)
        check("encoder_hid_dim_type", lambda v: v is None, None)
        check("resnet_time_scale_shift", lambda v: v == "default", "default")
        check("resnet_skip_time_act", lambda v: not v, False)
        check("resnet_out_scale_factor", lambda v: v == 1.0, 1.0)
        check("dual_cross_attention", lambda v: not v, False)
        check("class_embeddings_concat", lambda v: not v, False)
        check("cross_attention_norm", lambda v: v is None, None)
        check("attention_type", lambda v: v == "default", "default")
        check("num_attention_heads", lambda v: v is None, None)
        check("reverse_transformer_layers_per_block", lambda v: v is None, None)
        check("cross_attention_dim", lambda v: isinstance(v, int), 1280)
        down = tuple(cfg.get("down_block_types", UNetConfig.down_block_types))
        up = tuple(cfg.get("up_block_types", UNetConfig.up_block_types))
        for key, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
            for t in types:
                if t not in known:
                    raise UnsupportedArchitectureError(f"UNet config: {key} entry {t!r} is not supported")
        n = len(down)
        if len(up) != n or len(cfg.get("block_out_channels", UNetConfig.block_out_channels)) != n:
            raise UnsupportedArchitectureError(
                "UNet config: down_block_types, up_block_types, block_out_channels differ in length"
            )
        sample = cfg.get("sample_size", 64)
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            sample_size=sample[0] if isinstance(sample, (list, tuple)) else sample,
            block_out_channels=tuple(cfg.get("block_out_channels", UNetConfig.block_out_channels)),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_per_block(cfg.get("layers_per_block", 2), n, "layers_per_block"),
            attention_heads=_per_block(cfg.get("attention_head_dim", 8), n, "attention_head_dim"),
            transformer_layers_per_block=_per_block(
                cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
            ),
            only_cross_attention=_per_block(cfg.get("only_cross_attention", False), n, "only_cross_attention"),
            cross_attention_dim=cfg.get("cross_attention_dim", 1280),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            has_mid_block=cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None,
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            downsample_padding=cfg.get("downsample_padding", 1),
            mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0),
            conv_in_kernel=cfg.get("conv_in_kernel", 3),
            conv_out_kernel=cfg.get("conv_out_kernel", 3),
            num_class_embeds=cfg.get("num_class_embeds"),
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"),
            time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "mid_block_type": "UNetMidBlock2DCrossAttn" if self.has_mid_block else None,
            "layers_per_block": list(self.layers_per_block),
            "attention_head_dim": list(self.attention_heads),
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "only_cross_attention": list(self.only_cross_attention),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "conv_in_kernel": self.conv_in_kernel,
            "conv_out_kernel": self.conv_out_kernel,
            "act_fn": "silu",
            "num_class_embeds": self.num_class_embeds,
            "class_embed_type": None,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "time_cond_proj_dim": self.time_cond_proj_dim,
        }


class UNet2DConditionModel(nn.Module):
    """The denoising U-Net. Inputs NHWC; ``timesteps`` may be float (no int cast, unlike diffusers' old Flax port).

    ``remat_policy`` (a key of ``REMAT_POLICIES``) rematerializes each block in
    the backward pass; ``query_chunk_size`` bounds attention memory; ``attention`` names the attention kernel and
    ``conv`` the convolution algorithm.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    query_chunk_size: int | None = None
    attention: str = "xla"  # the attention kernel (sd_jax.models.attention_kernels), resolved from config
    conv: str = "xla"  # the convolution algorithm (sd_jax.models.conv_kernels), resolved from config

    @nn.compact
    def __call__(
        self,
        sample,
        timesteps,
        encoder_hidden_states,
        *,
        class_labels=None,
        text_embeds=None,
        time_ids=None,
        timestep_cond=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        ip_hidden_states=None,
    ):
        """``*_additional_residuals`` come from ControlNets (added to the skips and the mid block's output);
        ``ip_hidden_states`` are IP-Adapter image tokens, handed to the attention layers with the text."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b = sample.shape[0]
        context = encoder_hidden_states.astype(self.dtype)
        if ip_hidden_states is not None:
            context = (context, ip_hidden_states)
        emb = time_conditioning(
            cfg, kw, b, timesteps, class_labels=class_labels, text_embeds=text_embeds, time_ids=time_ids,
            timestep_cond=timestep_cond,
        )  # fmt: skip
        x = conv(cfg.block_out_channels[0], kernel_size=cfg.conv_in_kernel, name="conv_in", kernel=self.conv, **kw)(
            sample.astype(self.dtype)
        )
        common = block_options(cfg, kw, self.query_chunk_size, self.attention, self.conv)
        x, skips = down_and_mid(cfg, common, x, emb, context, self.remat_policy)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} entries; "
                    f"this U-Net has {len(skips)} skip connections"
                )
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)
        n = len(cfg.block_out_channels)
        block = functools.partial(remat, policy=self.remat_policy)

        rev = lambda v: tuple(reversed(v))  # noqa: E731
        for i, kind in enumerate(cfg.up_block_types):
            layers = rev(cfg.layers_per_block)[i] + 1
            mine, skips = skips[-layers:], skips[:-layers]
            # Upsample to the next skip's size, so odd latent sizes work as in diffusers.
            size = (skips[-1].shape[1], skips[-1].shape[2]) if i < n - 1 else None
            x = block(UpBlock)(
                rev(cfg.block_out_channels)[i],
                layers,
                has_attention=_UP[kind],
                heads=rev(cfg.attention_heads)[i],
                transformer_layers=rev(cfg.transformer_layers_per_block)[i],
                only_cross_attention=rev(cfg.only_cross_attention)[i],
                add_upsample=i < n - 1,
                upsample_size=size,
                name=f"up_blocks_{i}",
                **common,
            )(x, tuple(mine), emb, context)

        x = group_norm(cfg.norm_num_groups, eps=cfg.norm_eps, name="conv_norm_out", param_dtype=self.param_dtype)(x)
        x = nn.silu(x).astype(self.dtype)
        return conv(cfg.out_channels, kernel_size=cfg.conv_out_kernel, name="conv_out", kernel=self.conv, **kw)(x)


def _dummy_inputs(config: UNetConfig, batch=1):
    s = 8 if config.sample_size >= 8 else config.sample_size
    extra = {}
    if config.num_class_embeds is not None:
        extra["class_labels"] = jnp.zeros((batch,), jnp.int32)
    if config.addition_embed_type == "text_time":
        n_time = 6
        extra["text_embeds"] = jnp.zeros(
            (batch, config.projection_class_embeddings_input_dim - n_time * config.addition_time_embed_dim)
        )
        extra["time_ids"] = jnp.zeros((batch, n_time))
    if config.time_cond_proj_dim is not None:
        extra["timestep_cond"] = jnp.zeros((batch, config.time_cond_proj_dim))
    args = (
        jnp.zeros((batch, s, s, config.in_channels)),
        jnp.zeros((batch,)),
        jnp.zeros((batch, 1, config.cross_attention_dim)),
    )
    return args, extra


def abstract_params(config: UNetConfig, param_dtype=jnp.float32):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    model = UNet2DConditionModel(config, param_dtype=param_dtype)
    args, extra = _dummy_inputs(config)
    shapes = jax.eval_shape(lambda k: model.init(k, *args, **extra), jax.random.key(0))
    return nn.meta.unbox(shapes["params"])


def init_params(config: UNetConfig, key, param_dtype=jnp.float32):
    """Random parameters (diffusers-like init is not needed: real weights are loaded)."""
    model = UNet2DConditionModel(config, param_dtype=param_dtype)
    args, extra = _dummy_inputs(config)
    return nn.meta.unbox(jax.jit(lambda k: model.init(k, *args, **extra))(key)["params"])
