"""The models of a Stable Diffusion checkpoint, assembled once: sampling and training both take this value.

:class:`Components` holds the U-Net, the VAE, the text encoders and their tokenizers (one for SD 1.x/2.x, two for
SDXL) and the trained noise schedule. It is built by :func:`from_checkpoint` (a loaded diffusers folder or single
file), :func:`load` (a path or Hub id) or :func:`from_configs` (a from-scratch architecture). Parameters live
beside it in one dict keyed by component name (``"unet"``, ``"vae"``, ``"text_encoder"``, ``"text_encoder_2"``).

The pure functions over ``(components, params)`` do the work both sides share:

- :func:`encode_prompt`: token ids -> the U-Net's text conditioning, as diffusers' ``encode_prompt``;
- :func:`encode_posterior` / :func:`sample_latents` / :func:`encode_images`: [-1, 1] images -> scaled latents
  ``(z - shift_factor) * scaling_factor``;
- :func:`decode_latents`: scaled latents -> [-1, 1] images.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models import attention_kernels, conv_kernels
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.schedules import NoiseSchedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}
TEXT_NAMES = ("text_encoder", "text_encoder_2")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")


def dtype_of(dtype) -> Any:
    """A jnp dtype from a name in :data:`DTYPES` (or a dtype, returned as is)."""
    if not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of jit
class Components:
    unet: unet_lib.UNet2DConditionModel
    vae: vae_lib.AutoencoderKL
    text_encoders: tuple[clip_lib.CLIPTextModel, ...]
    tokenizers: tuple
    schedule: NoiseSchedule  # the trained noise schedule (the training objective's; samplers read scheduler_config)
    scheduler_config: dict = dataclasses.field(default_factory=dict)  # scheduler_config.json (+ model_index class)
    pipeline_class: str = ""
    force_zeros_for_empty_prompt: bool = False
    path: pathlib.Path | None = None  # the folder loaded from (its tokenizers, model_index, extra parts)
    index: dict = dataclasses.field(default_factory=dict)  # its model_index.json
    text_keys: tuple[str, ...] = ()  # the encoders' names when not the first ones (the refiner: text_encoder_2)

    @property
    def sdxl(self) -> bool:
        """SDXL conditioning (two encoders, or the refiner's OpenCLIP bigG alone)."""
        return len(self.text_encoders) == 2 or self.refiner

    @property
    def refiner(self) -> bool:
        """The SDXL refiner: ``text_encoder_2`` only (diffusers' ``StableDiffusionXLImg2ImgPipeline`` folder)."""
        return self.text_names == ("text_encoder_2",)

    @property
    def requires_aesthetics_score(self) -> bool:
        """The U-Net's time ids end in an aesthetic score, not the target size (model_index.json, the refiner)."""
        return bool(self.index.get("requires_aesthetics_score", False))

    @property
    def text_names(self) -> tuple[str, ...]:
        return self.text_keys or TEXT_NAMES[: len(self.text_encoders)]

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def replace(self, **kw) -> Components:
        return dataclasses.replace(self, **kw)


# -- building --


def _tokenizer(folder: pathlib.Path | None, positions: int):
    from sd_jax.tokenizer import fit_to_encoder, load_tokenizer

    return fit_to_encoder(load_tokenizer(folder), positions)


def _param_dtype(comps: Components, name: str):
    """The parameter dtype of component ``name``'s module."""
    dts = {"unet": comps.unet.param_dtype, "vae": comps.vae.param_dtype,
           **{n: m.param_dtype for n, m in zip(comps.text_names, comps.text_encoders)}}  # fmt: skip
    return dts.get(name, jnp.float32)


def from_checkpoint(ckpt, *, dtype="float32", param_dtype=None, vae_dtype=None, query_chunk_size=None,
                    remat_policy=None, attention="auto", conv="auto",
                    release=False) -> tuple[Components, dict]:  # fmt: skip
    """``(components, params)`` of a loaded :class:`~sd_jax.loading.diffusers.Checkpoint`.

    ``dtype`` is the compute dtype of the U-Net and text encoders; ``param_dtype`` their weights' (default: the
    compute dtype, as for sampling; training keeps float32 masters). The VAE computes in ``vae_dtype``, by default
    float32 when its config says ``force_upcast`` (as diffusers upcasts fp16 VAEs that overflow), else ``dtype``.
    ``attention``: the U-Net's and VAE's attention kernel (:func:`sd_jax.models.attention_kernels.resolve`);
    ``conv``: the U-Net's convolution algorithm (:func:`sd_jax.models.conv_kernels.resolve`).
    ``release``: drop each component's host arrays from ``ckpt`` once they are on the device (the caller owns it).
    """
    kernel = attention_kernels.resolve(attention)
    dt = dtype_of(dtype)
    pdt = dt if param_dtype is None else dtype_of(param_dtype)
    vcfg = ckpt.config("vae")
    vdt = dtype_of(vae_dtype) if vae_dtype is not None else (jnp.float32 if vcfg.force_upcast else dt)
    names = [n for n in TEXT_NAMES if n in ckpt.models]
    unet = unet_lib.UNet2DConditionModel(ckpt.config("unet"), dtype=dt, param_dtype=pdt,
                                         query_chunk_size=query_chunk_size, remat_policy=remat_policy,
                                         attention=kernel, conv=conv_kernels.resolve(conv))  # fmt: skip
    vae = vae_lib.AutoencoderKL(vcfg, dtype=vdt, param_dtype=vdt if param_dtype is None else pdt, attention=kernel)
    texts = tuple(clip_lib.CLIPTextModel(ckpt.config(n), dtype=dt, param_dtype=pdt) for n in names)
    tokenizers = tuple(_tokenizer(ckpt.tokenizer_dir(TOKENIZER_NAMES[TEXT_NAMES.index(n)]),
                                  ckpt.config(n).max_position_embeddings) for n in names)  # fmt: skip
    raw = dict(ckpt.scheduler_config)
    listed = ckpt.index.get("scheduler")  # diffusers builds the class model_index.json names
    if isinstance(listed, (list, tuple)) and len(listed) == 2 and listed[1]:
        raw["_class_name"] = listed[1]
    comps = Components(
        unet=unet,
        vae=vae,
        text_encoders=texts,
        tokenizers=tokenizers,
        schedule=NoiseSchedule.from_diffusers_config(ckpt.scheduler_config),
        scheduler_config=raw,
        pipeline_class=ckpt.pipeline_class,
        force_zeros_for_empty_prompt=bool(ckpt.index.get("force_zeros_for_empty_prompt", False)),
        path=ckpt.path,
        index=dict(ckpt.index),
        text_keys=tuple(names) if names != list(TEXT_NAMES[: len(names)]) else (),
    )
    params = {}
    for n in ("unet", "vae", *names):  # one component at a time, its host arrays dropped once on the device
        params[n] = _on_device(ckpt.params(n), _param_dtype(comps, n))
        if release:
            ckpt.models[n] = (ckpt.models[n][0], None)
    return comps, params


def _on_device(tree, dtype, chunk: int = 256 << 20):
    """``tree``'s host arrays (memory-mapped or converted) as device arrays of ``dtype``, leaf by leaf; every
    ``chunk`` bytes the copies are waited for and the checkpoint files' pages leave resident memory. Memory-mapped
    weights in their final dtype thus never sit resident twice; arrays the loader already converted (an fp16 file
    upcast, say) stay on the host until the caller drops them (``release``)."""
    from sd_jax.loading.safetensors_io import drop_mapped_pages

    done = 0

    def put(a):
        nonlocal done
        out = jnp.asarray(a, dtype)
        done += out.nbytes
        if done >= chunk:
            out.block_until_ready()
            drop_mapped_pages()
            done = 0
        return out

    out = jax.tree.map(put, tree)
    jax.block_until_ready(out)
    drop_mapped_pages()
    return out


def load(path, *, config_dir=None, allow_pickle=False, **kw) -> tuple[Components, dict]:
    """:func:`from_checkpoint` of a diffusers folder, a Hub id or a single ``.safetensors`` file."""
    from sd_jax.loading.diffusers import load_checkpoint

    p = pathlib.Path(str(path))
    if p.is_file():
        from sd_jax.loading.single_file import load_single_file

        return from_checkpoint(load_single_file(p, config_dir=config_dir, allow_pickle=allow_pickle), **kw)
    return from_checkpoint(load_checkpoint(path, allow_pickle=allow_pickle), **kw)


def from_configs(ucfg, vcfg, tcfg, key, *, dtype="float32", schedule: NoiseSchedule | None = None,
                 remat_policy=None, params: dict | None = None,
                 attention="auto", conv="auto") -> tuple[Components, dict]:  # fmt: skip
    """A from-scratch model: random float32 weights (``fold_in(key, 0/1/2)`` for U-Net, VAE and text encoder)
    unless ``params`` gives some, the shipped CLIP vocabulary, and ``schedule`` (default: SD's)."""
    dt, kernel = dtype_of(dtype), attention_kernels.resolve(attention)
    schedule = schedule or NoiseSchedule()
    comps = Components(
        unet=unet_lib.UNet2DConditionModel(
            ucfg, dtype=dt, remat_policy=remat_policy, attention=kernel, conv=conv_kernels.resolve(conv)
        ),  # fmt: skip
        vae=vae_lib.AutoencoderKL(vcfg, dtype=jnp.float32, attention=kernel),
        text_encoders=(clip_lib.CLIPTextModel(tcfg, dtype=dt),),
        tokenizers=(_tokenizer(None, tcfg.max_position_embeddings),),
        schedule=schedule,
        scheduler_config={"_class_name": "EulerDiscreteScheduler", **dataclasses.asdict(schedule)},
        pipeline_class="StableDiffusionPipeline",
    )
    given = dict(params or {})
    inits = (("unet", unet_lib, ucfg), ("vae", vae_lib, vcfg), ("text_encoder", clip_lib, tcfg))
    out = {n: given[n] if n in given else lib.init_params(c, jax.random.fold_in(key, i))
           for i, (n, lib, c) in enumerate(inits)}  # fmt: skip
    return comps, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


# -- text --


def tokenize_prompts(comps: Components, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
    """``int32 [B, L]`` ids for every tokenizer (each padded as its own)."""
    from sd_jax.tokenizer import tokenize

    return tuple(tokenize(tok, list(prompts)) for tok in comps.tokenizers)


def sdxl_text_conditioning(outs, clip_skip: int | None = None) -> dict[str, jax.Array]:
    """SDXL's U-Net conditioning from both encoders' outputs (diffusers ``StableDiffusionXLPipeline.encode_prompt``).

    ``context``: the penultimate hidden states (``clip_skip`` layers earlier) of every encoder, concatenated on
    features; ``text_embeds``: the last encoder's projected pooled output.
    """
    layer = -2 - (clip_skip or 0)
    context = jnp.concatenate([o.hidden_states[layer] for o in outs], axis=-1)
    return {"context": context, "text_embeds": outs[-1].text_embeds}


def sdxl_time_ids(original_size, crop_top_left, target_size) -> jax.Array:
    """SDXL micro-conditioning ``[B, 6]`` float32: original (h, w), crop (top, left), target (h, w).

    Each argument is a pair or a ``[B, 2]`` array; pairs are broadcast over the batch (Podell et al. 2023,
    section 2.2; diffusers ``_get_add_time_ids``).
    """
    return _time_ids(original_size, crop_top_left, jnp.asarray(target_size, jnp.float32).reshape(-1, 2))


def refiner_time_ids(original_size, crop_top_left, aesthetic_score) -> jax.Array:
    """The SDXL refiner's ``[B, 5]``: original (h, w), crop (top, left), aesthetic score (a number or ``[B]``),
    diffusers ``StableDiffusionXLImg2ImgPipeline._get_add_time_ids`` with ``requires_aesthetics_score``."""
    return _time_ids(original_size, crop_top_left, jnp.asarray(aesthetic_score, jnp.float32).reshape(-1, 1))


def _time_ids(original_size, crop_top_left, last) -> jax.Array:
    parts = [jnp.asarray(a, jnp.float32).reshape(-1, 2) for a in (original_size, crop_top_left)] + [last]
    b = max(p.shape[0] for p in parts)
    return jnp.concatenate([jnp.broadcast_to(p, (b, p.shape[1])) for p in parts], axis=-1)


def encode_text(comps: Components, params: dict, ids: Sequence, i: int = 0):
    """Encoder ``i``'s raw output (``TextOutput``) for its ids."""
    return comps.text_encoders[i].apply({"params": params[comps.text_names[i]]}, ids[i])


def encode_prompt(comps: Components, params: dict, ids: Sequence, clip_skip: int | None = None) -> dict:
    """The U-Net's text conditioning from token ids (one array per encoder).

    SD 1.x/2.x: ``{"context"}``, the last hidden state, or with ``clip_skip`` an earlier layer's output through
    the final layer norm (diffusers' ``clip_skip``). SDXL: :func:`sdxl_text_conditioning`.
    """
    outs = [encode_text(comps, params, ids, i) for i in range(len(comps.text_encoders))]
    if comps.sdxl:
        return sdxl_text_conditioning(outs, clip_skip)
    if not clip_skip:
        return {"context": outs[0].last_hidden_state}
    ln = params["text_encoder"]["text_model"]["final_layer_norm"]
    eps = comps.text_encoders[0].config.layer_norm_eps
    return {"context": nn.LayerNorm(epsilon=eps).apply({"params": ln}, outs[0].hidden_states[-(clip_skip + 1)])}


# -- images and latents --


def encode_posterior(comps: Components, params: dict, images, tiled: bool = False):
    """[-1, 1] NHWC images -> the VAE posterior ``(mean, logvar)`` (unscaled); ``tiled`` encodes tile by tile."""
    if tiled:
        return vae_lib.tiled_encode(comps.vae, params["vae"], images)
    return comps.vae.apply({"params": params["vae"]}, images, method=vae_lib.AutoencoderKL.encode)


def sample_latents(comps: Components, mean, logvar, key=None):
    """Scaled latents ``(z - shift_factor) * scaling_factor`` from a posterior: a sample with ``key``, else its mode."""
    post = vae_lib.DiagonalGaussian(mean, logvar)
    z = post.mode() if key is None else post.sample(key)
    cfg = comps.vae.config
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def encode_images(comps: Components, params: dict, images, key=None, tiled: bool = False):
    """[-1, 1] NHWC images -> scaled latents (:func:`encode_posterior` then :func:`sample_latents`)."""
    mean, logvar = encode_posterior(comps, params, images, tiled)
    return sample_latents(comps, mean, logvar, key)


def decode_latents(comps: Components, params: dict, latents, tiled: bool = False):
    """Scaled latents -> [-1, 1] NHWC images (float32); ``tiled`` decodes tile by tile with blended seams."""
    cfg = comps.vae.config
    z = jnp.asarray(latents, jnp.float32) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    if tiled:
        return vae_lib.tiled_decode(comps.vae, params["vae"], z)
    return comps.vae.apply({"params": params["vae"]}, z, method=vae_lib.AutoencoderKL.decode)
