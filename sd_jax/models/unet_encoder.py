"""The half of the U-Net that a ControlNet copies: time conditioning, ``conv_in``, down and mid blocks.

``UNet2DConditionModel`` and ``ControlNetModel`` both call these functions from
their compact ``__call__``, so the submodules they create get the same names
(``time_embedding``, ``add_embedding``, ``down_blocks_i``, ``mid_block``) in
both parameter trees, as in diffusers, and ``ControlNetModel.from_unet`` is a
copy of matching subtrees.

The text ``context`` passed to the blocks is opaque here: an array, or a tuple
that the attention layers unpack (IP-Adapter image tokens ride along with it).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models.layers import dense, embed
from sd_jax.models.unet_blocks import DownBlock, MidBlock

DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def timestep_embedding(t, dim, *, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
    """diffusers ``get_timestep_embedding``: sinusoidal features of (float) timesteps, in float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1, silu, linear_2 (+ optional ``cond_proj``)."""

    features: int
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, condition=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if condition is not None:
            x = x + dense(x.shape[-1], use_bias=False, name="cond_proj", **kw)(condition)
        x = dense(self.features, name="linear_1", **kw)(x)
        return dense(self.features, name="linear_2", axes=("mlp", "embed"), **kw)(nn.silu(x))


def time_conditioning(cfg, kw, batch, timesteps, *, class_labels=None, text_embeds=None, time_ids=None,
                      timestep_cond=None):  # fmt: skip
    """The embedding added to every resnet: timestep (+ class label, + SDXL ``text_time``)."""
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    dtype = kw["dtype"]
    t = timestep_embedding(
        timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
    )
    emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t.astype(dtype), timestep_cond)
    if cfg.num_class_embeds is not None:
        if class_labels is None:
            raise ValueError("this U-Net has a class embedding (x4 upscaler noise level): pass class_labels")
        labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32).reshape(-1), (batch,))
        table = embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding", param_dtype=kw["param_dtype"])
        emb = emb + table(labels).astype(dtype)
    if cfg.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError("an SDXL U-Net (addition_embed_type='text_time') needs text_embeds and time_ids")
        tid = timestep_embedding(
            time_ids.reshape(-1), cfg.addition_time_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).reshape(batch, -1)  # fmt: skip
        add = jnp.concatenate([text_embeds.astype(jnp.float32), tid], axis=-1).astype(dtype)
        emb = emb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(add)
    return emb


def block_options(cfg, kw, query_chunk_size, attention="xla", conv="xla"):
    return dict(
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        query_chunk_size=query_chunk_size,
        attention=attention,
        conv=conv,
        **kw,
    )


def remat(cls, policy: str | None):
    return cls if policy is None else nn.remat(cls, policy=REMAT_POLICIES[policy])


def down_and_mid(cfg, common, x, emb, context, remat_policy=None):
    """Down blocks then the mid block; returns ``(h, skips)``, skips starting with ``x`` itself."""
    n = len(cfg.block_out_channels)
    skips = [x]
    for i, kind in enumerate(cfg.down_block_types):
        x, s = remat(DownBlock, remat_policy)(
            cfg.block_out_channels[i],
            cfg.layers_per_block[i],
            has_attention=DOWN_TYPES[kind],
            heads=cfg.attention_heads[i],
            transformer_layers=cfg.transformer_layers_per_block[i],
            only_cross_attention=cfg.only_cross_attention[i],
            add_downsample=i < n - 1,
            downsample_padding=cfg.downsample_padding,
            name=f"down_blocks_{i}",
            **common,
        )(x, emb, context)
        skips.extend(s)
    if cfg.has_mid_block:
        x = remat(MidBlock, remat_policy)(
            cfg.block_out_channels[-1],
            1,
            heads=cfg.attention_heads[-1],
            transformer_layers=cfg.transformer_layers_per_block[-1],
            output_scale_factor=cfg.mid_block_scale_factor,
            name="mid_block",
            **common,
        )(x, emb, context)
    return x, skips
