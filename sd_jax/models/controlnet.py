"""diffusers ``ControlNetModel`` as a Flax Linen module, NHWC.

A ControlNet is a trainable copy of the U-Net's encoder half (time
conditioning, ``conv_in``, down and mid blocks; see ``unet_encoder``) plus a
small conditioning embedding for the control image, and one zero-initialised
1x1 convolution per skip connection. Its outputs are added to the U-Net's
skips and mid block (``down_block_additional_residuals`` /
``mid_block_additional_residual``). SD 1.x, SD 2.x and SDXL (``text_time``)
variants come from the U-Net config they are built on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.models.layers import Dtype, conv, logical
from sd_jax.models.unet import UNetConfig
from sd_jax.models.unet import _dummy_inputs as _unet_dummy_inputs
from sd_jax.models.unet_encoder import block_options, down_and_mid, time_conditioning

# The subtrees ``ControlNetModel.from_unet`` copies from the U-Net (the rest starts fresh).
FROM_UNET = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "mid_block")
_UP_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_OWN_KEYS = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
    "controlnet_conditioning_channel_order",
    "addition_embed_type_num_heads",
)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the U-Net architecture it copies (``unet``; its up blocks are unused) and its own fields."""

    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    channel_order: str = "rgb"  # "bgr": the control image's channels are flipped first

    @property
    def cross_attention_dim(self) -> int:
        return self.unet.cross_attention_dim

    @property
    def num_residuals(self) -> int:
        """Skip connections of the encoder: conv_in, one per resnet, one per downsampler."""
        n = len(self.unet.block_out_channels)
        return 1 + sum(self.unet.layers_per_block) + (n - 1)

    @classmethod
    def from_unet_config(cls, unet: UNetConfig, **kw) -> ControlNetConfig:
        """diffusers ``ControlNetModel.from_unet``'s config: the U-Net's, as a 4-channel (never 9) ControlNet."""
        return cls(unet=unet, **kw)

    @classmethod
    def tiny(cls, unet: UNetConfig | None = None, **kw) -> ControlNetConfig:
        kw.setdefault("conditioning_embedding_out_channels", (8, 16))
        return cls(unet=unet or UNetConfig.tiny(), **kw)

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> ControlNetConfig:
        order = cfg.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise UnsupportedArchitectureError(f"ControlNet config: controlnet_conditioning_channel_order={order!r}")
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise UnsupportedArchitectureError(f"ControlNet config: mid_block_type={cfg['mid_block_type']!r}")
        emb = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        unet_cfg = {k: v for k, v in cfg.items() if k not in _OWN_KEYS}
        down = unet_cfg.get("down_block_types", UNetConfig.down_block_types)
        unet_cfg["up_block_types"] = [_UP_OF.get(t, t) for t in reversed(down)]
        return cls(
            unet=UNetConfig.from_diffusers_config(unet_cfg),
            conditioning_channels=cfg.get("conditioning_channels", 3),
            conditioning_embedding_out_channels=tuple(emb),
            global_pool_conditions=bool(cfg.get("global_pool_conditions", False)),
            channel_order=order,
        )

    def to_diffusers_config(self) -> dict[str, Any]:
        out = self.unet.to_diffusers_config()
        if len(set(self.unet.layers_per_block)) != 1:  # diffusers' ControlNetModel takes one int
            raise UnsupportedArchitectureError(
                f"ControlNet: layers_per_block={self.unet.layers_per_block} differs per block; diffusers needs one"
            )
        out["layers_per_block"] = self.unet.layers_per_block[0]
        for key in ("up_block_types", "out_channels", "conv_in_kernel", "conv_out_kernel", "time_cond_proj_dim"):
            out.pop(key)
        out.update(
            _class_name="ControlNetModel",
            conditioning_channels=self.conditioning_channels,
            conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
            global_pool_conditions=self.global_pool_conditions,
            controlnet_conditioning_channel_order=self.channel_order,
        )
        return out


class ConditioningEmbedding(nn.Module):
    """diffusers ``ControlNetConditioningEmbedding``: conv_in, (conv, stride-2 conv) per level, zero conv_out."""

    features: int
    channels: tuple[int, ...]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(conv(self.channels[0], name="conv_in", **kw)(x))
        for i in range(len(self.channels) - 1):
            x = nn.silu(conv(self.channels[i], name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(conv(self.channels[i + 1], stride=2, name=f"blocks_{2 * i + 1}", **kw)(x))
        return zero_conv(self.features, name="conv_out", kernel_size=3, **kw)(x)


def zero_conv(features, *, name, kernel_size=1, dtype=jnp.float32, param_dtype=jnp.float32):
    """A convolution whose weights start at zero (a fresh ControlNet changes nothing)."""
    pad = kernel_size // 2
    return nn.Conv(
        features,
        kernel_size=(kernel_size, kernel_size),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(nn.initializers.zeros_init(), (None, None, "conv_in", "conv_out")),
        bias_init=logical(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def guess_mode_scales(n: int) -> np.ndarray:
    """diffusers' guess-mode weights: ``logspace(-1, 0, n + 1)``, from 0.1 (first skip) to 1.0 (mid block)."""
    return np.logspace(-1, 0, n + 1, dtype=np.float32)


class ControlNetModel(nn.Module):
    """Returns ``(down_block_res_samples, mid_block_res_sample)``, already scaled.

    ``controlnet_cond`` is the control image, NHWC in [0, 1], at pixel size
    (8x the latents). ``conditioning_scale`` may be a traced scalar, so changing
    it (or zeroing it outside ``control_guidance_start/end``) does not recompile.
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    query_chunk_size: int | None = None
    attention: str = "xla"  # the attention kernel, resolved from config (as the U-Net's)
    conv: str = "xla"  # the convolution algorithm, resolved from config (as the U-Net's)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, *, conditioning_scale=1.0,
                 guess_mode: bool = False, class_labels=None, text_embeds=None, time_ids=None,
                 timestep_cond=None):  # fmt: skip
        cfg, ucfg = self.config, self.config.unet
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if controlnet_cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(
                f"control image has {controlnet_cond.shape[-1]} channels; this ControlNet takes "
                f"{cfg.conditioning_channels} (shape {tuple(controlnet_cond.shape)}, NHWC)"
            )
        if cfg.channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        context = encoder_hidden_states.astype(self.dtype)
        emb = time_conditioning(
            ucfg, kw, sample.shape[0], timesteps, class_labels=class_labels, text_embeds=text_embeds,
            time_ids=time_ids, timestep_cond=timestep_cond,
        )  # fmt: skip
        x = conv(ucfg.block_out_channels[0], kernel_size=ucfg.conv_in_kernel, name="conv_in", kernel=self.conv, **kw)(
            sample.astype(self.dtype)
        )
        hint = ConditioningEmbedding(
            ucfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, name="controlnet_cond_embedding", **kw
        )(controlnet_cond.astype(self.dtype))
        x = x + hint
        common = block_options(ucfg, kw, self.query_chunk_size, self.attention, self.conv)
        x, skips = down_and_mid(ucfg, common, x, emb, context, self.remat_policy)
        down = [zero_conv(s.shape[-1], name=f"controlnet_down_blocks_{i}", **kw)(s) for i, s in enumerate(skips)]
        mid = zero_conv(x.shape[-1], name="controlnet_mid_block", **kw)(x)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not cfg.global_pool_conditions:
            scales = jnp.asarray(guess_mode_scales(len(down))) * scale
        else:
            scales = jnp.broadcast_to(scale, (len(down) + 1,))
        down = [(d * scales[i]).astype(d.dtype) for i, d in enumerate(down)]
        mid = (mid * scales[-1]).astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


def _dummy_inputs(config: ControlNetConfig, batch=1):
    args, extra = _unet_dummy_inputs(config.unet, batch)
    s = args[0].shape[1] * 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    return (*args, jnp.zeros((batch, s, s, config.conditioning_channels))), extra


def abstract_params(config: ControlNetConfig, param_dtype=jnp.float32):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    model = ControlNetModel(config, param_dtype=param_dtype)
    args, extra = _dummy_inputs(config)
    shapes = jax.eval_shape(lambda k: model.init(k, *args, **extra), jax.random.key(0))
    return nn.meta.unbox(shapes["params"])


def init_params(config: ControlNetConfig, key, param_dtype=jnp.float32):
    """Fresh parameters: zero convolutions at zero, the rest random."""
    model = ControlNetModel(config, param_dtype=param_dtype)
    args, extra = _dummy_inputs(config)
    return nn.meta.unbox(jax.jit(lambda k: model.init(k, *args, **extra))(key)["params"])


def from_unet(unet_config: UNetConfig, unet_params, key, *, conditioning_channels: int = 3,
              conditioning_embedding_out_channels=(16, 32, 96, 256), channel_order: str = "rgb"):  # fmt: skip
    """diffusers ``ControlNetModel.from_unet``: the U-Net's encoder weights, fresh hint encoder, zero convs.

    A 9-channel inpainting U-Net keeps ``in_channels=9``, as diffusers does. Returns ``(config, params)``.
    """
    config = ControlNetConfig(
        unet=unet_config,
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        channel_order=channel_order,
    )
    dtype = jax.tree.leaves(unet_params)[0].dtype
    shapes = abstract_params(config, param_dtype=dtype)  # traced, not compiled: the fresh parts are small
    hint = ConditioningEmbedding(unet_config.block_out_channels[0], config.conditioning_embedding_out_channels,
                                 param_dtype=dtype)  # fmt: skip
    cond = jnp.zeros(_dummy_inputs(config)[0][-1].shape, dtype)
    params = {}
    for k, leaf in shapes.items():
        if k in FROM_UNET or k.startswith("down_blocks_"):
            params[k] = jax.tree.map(jnp.array, unet_params[k])
        elif k == "controlnet_cond_embedding":  # the hint encoder alone, not a whole-model init
            params[k] = nn.meta.unbox(jax.jit(hint.init)(key, cond)["params"])
        elif k.startswith("controlnet_"):  # zero convolutions
            params[k] = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), leaf)
        else:
            raise ValueError(f"from_unet: no rule for ControlNet parameter {k!r}")
    return config, params
