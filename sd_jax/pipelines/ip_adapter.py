"""IP-Adapter image prompts on a :class:`~sd_jax.pipelines.pipeline.StableDiffusion`, as diffusers'
``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``ip_adapter_image=``.

``load_ip_adapter(pipe, file)`` loads the adapter(s) (:mod:`sd_jax.loading.ip_adapter`) and the CLIP image encoder
(default: the ``image_encoder/`` folder beside the file, the h94 layout), adds the adapters' attention weights to
``pipe.params["unet"]`` and keeps the rest in ``pipe.ip_adapter``. :func:`image_conditioning` turns images into
the U-Net's ``ip`` conditioning: per adapter ``(tokens [N, T, D], scale [N])``, the image tokens and, for
classifier-free guidance, those of the negative (plain IP-Adapter: the projection of zero embeddings; Plus: of the
zeros image's hidden states), as ``prepare_ip_adapter_image_embeds``. They ride in ``cond["ip"]`` /
``uncond["ip"]`` through the one jitted loop (stacked, sharded and micro-batched like the text), and the scale is
traced, so :func:`set_ip_adapter_scale` never recompiles. :func:`generate_with_ip` is txt2img (or any mode's
``Start``) with an image prompt.

The pipeline's modes take ``ip_adapter_image=`` (``StableDiffusion.generate`` builds the ``ip`` entries with
:func:`image_conditioning`, and its model function hands them to the U-Net as ``ip_hidden_states``).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sd_jax.loading import ip_adapter as ip_loading
from sd_jax.models import ip_adapter as ipa
from sd_jax.models.clip_vision import CLIPVisionModelWithProjection, preprocess


@dataclasses.dataclass
class IPAdapterState:
    encoder: CLIPVisionModelWithProjection
    encoder_params: dict
    adapters: list  # [LoadedIPAdapter], adapter i is the U-Net's to_k_ip_<i>
    scales: list[float]

    @property
    def size(self) -> int:
        return self.encoder.config.image_size


def _param_dtype(params):
    return jax.tree.leaves(params)[0].dtype


def _resolve(path, weight_name=None, subfolder=None) -> pathlib.Path:
    p = pathlib.Path(path)
    if p.is_dir():
        if weight_name is None:
            raise ValueError(f"{p} is a folder: pass weight_name= (e.g. 'ip-adapter_sd15.safetensors')")
        p = p / (subfolder or "") / weight_name
    return p


def load_ip_adapter(pipe, path, image_encoder=None, *, weight_name=None, subfolder=None, scale=1.0,
                    allow_pickle: bool = False) -> IPAdapterState:  # fmt: skip
    """Load one IP-Adapter file (or a list: several adapters at once), replacing any loaded before.

    ``path``: a file, or a folder with ``weight_name`` (and ``subfolder``, as diffusers). ``image_encoder``: a
    ``CLIPVisionModelWithProjection`` folder (default ``image_encoder/`` beside the first file).
    """
    from sd_jax.loading.diffusers import load_component

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    names = list(weight_name) if isinstance(weight_name, (list, tuple)) else [weight_name] * len(paths)
    files = [_resolve(p, n, subfolder) for p, n in zip(paths, names)]
    folder = pathlib.Path(image_encoder) if image_encoder is not None else files[0].parent / "image_encoder"
    dtype = _param_dtype(pipe.params["unet"])
    enc_cfg, enc_params = load_component(folder, dtype=dtype)
    unload_ip_adapter(pipe)
    adapters = [ip_loading.load(f, pipe.unet.config, enc_cfg, index=i, allow_pickle=allow_pickle, dtype=dtype)
                for i, f in enumerate(files)]  # fmt: skip
    flat = traverse_util.flatten_dict(pipe.params["unet"])
    for a in adapters:
        flat.update({k: jnp.asarray(v) for k, v in a.unet.items()})
    pipe.params["unet"] = traverse_util.unflatten_dict(flat)
    module = CLIPVisionModelWithProjection(enc_cfg, dtype=pipe.unet.dtype, param_dtype=dtype)
    pipe.ip_adapter = IPAdapterState(module, enc_params, adapters, [1.0] * len(adapters))
    set_ip_adapter_scale(pipe, scale)
    return pipe.ip_adapter


def set_ip_adapter_scale(pipe, scale: float | Sequence[float]) -> None:
    """The weight of each adapter's image attention (one number for all, or one per adapter); no recompile."""
    state = _state(pipe)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(state.adapters)
    if len(scales) != len(state.adapters):
        raise ValueError(f"{len(scales)} scales for {len(state.adapters)} loaded IP-Adapter(s)")
    state.scales = [float(s) for s in scales]


def unload_ip_adapter(pipe) -> None:
    """Drop the adapters' weights from the U-Net's params and the image encoder."""
    if getattr(pipe, "ip_adapter", None) is None:
        return
    flat = traverse_util.flatten_dict(pipe.params["unet"])
    pipe.params["unet"] = traverse_util.unflatten_dict({k: v for k, v in flat.items() if "processor" not in k})
    pipe.ip_adapter = None


def _state(pipe) -> IPAdapterState:
    state = getattr(pipe, "ip_adapter", None)
    if state is None:
        raise ValueError("no IP-Adapter is loaded: call load_ip_adapter(pipe, path) first")
    return state


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tokens(encoder, config, enc_params, proj_params, pixels):
    """(image tokens, negative tokens) ``[k, T, D]`` of ``k`` preprocessed images for one adapter."""
    proj = ipa.projection(config, dtype=encoder.dtype)
    if config.plus:
        hidden = encoder.apply({"params": enc_params}, jnp.concatenate([pixels, jnp.zeros_like(pixels)]))[1][-2]
        out = proj.apply({"params": proj_params}, hidden)
        return jnp.split(out, 2)
    embeds, _ = encoder.apply({"params": enc_params}, pixels)
    out = proj.apply({"params": proj_params}, jnp.concatenate([embeds, jnp.zeros_like(embeds)]))
    return jnp.split(out, 2)


def _as_images(image) -> np.ndarray:
    """[0, 1] float ``[H, W, 3]`` / ``[k, H, W, 3]``, or PIL images, -> ``[k, H, W, 3]`` floats."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"), np.float32) / 255.0
    elif isinstance(image, (list, tuple)):
        return np.concatenate([_as_images(i) for i in image])
    a = np.asarray(image, np.float32)
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"IP-Adapter image has shape {a.shape}; pass [H, W, 3] or [k, H, W, 3] floats in [0, 1]")
    if not np.isfinite(a).all() or a.min() < -1e-3 or a.max() > 1 + 1e-3:
        raise ValueError(f"IP-Adapter image values span [{a.min():g}, {a.max():g}]; pass floats in [0, 1]")
    return a[None] if a.ndim == 3 else a


def image_embeds(pipe, images) -> list[tuple[jax.Array, jax.Array]]:
    """Per adapter ``(tokens [1, k*T, D], negative [1, k*T, D])`` of its image(s); ``images`` is one image
    (batch) per adapter, a list when several adapters are loaded (diffusers' ``ip_adapter_image``)."""
    state = _state(pipe)
    n = len(state.adapters)
    per_adapter = [images] if n == 1 else list(images)
    if len(per_adapter) != n:
        raise ValueError(f"got {len(per_adapter)} IP-Adapter image(s) for {n} loaded adapters; pass one per adapter")
    out = []
    for a, img in zip(state.adapters, per_adapter):
        pixels = jnp.asarray(preprocess(np.clip(_as_images(img), 0, 1), state.size))
        pos, neg = _tokens(state.encoder, a.config, state.encoder_params, a.image_proj, pixels)
        out.append(tuple(t.reshape(1, -1, t.shape[-1]) for t in (pos, neg)))
    return out


def image_conditioning(pipe, images, n: int, embeds=None):
    """``(cond_ip, uncond_ip)``: per adapter ``(tokens [n, T, D], scale [n])`` for ``n`` images, for
    ``cond["ip"]`` and ``uncond["ip"]``. ``embeds`` (from :func:`image_embeds`) skips the encoder."""
    state = _state(pipe)
    embeds = image_embeds(pipe, images) if embeds is None else embeds
    scale = [jnp.full((n,), s, jnp.float32) for s in state.scales]
    batch = lambda t: jnp.broadcast_to(t, (n, *t.shape[1:]))  # noqa: E731
    cond = tuple((batch(p), s) for (p, _), s in zip(embeds, scale))
    uncond = tuple((batch(q), s) for (_, q), s in zip(embeds, scale))
    return cond, uncond


def generate_with_ip(pipe, prompts, ip_image, *, negative=None, start=None, steps=20, sampler=None,
                     guidance_scale=7.5, seed=0, noise=None, height=None, width=None, clip_skip=None,
                     ip_embeds=None, **generate_kw):  # fmt: skip
    """txt2img (or the mode whose :class:`~sd_jax.pipelines.starts.Start` is ``start``) with an image prompt;
    returns ``(images, extra)`` as the modes do. ``generate_kw`` go to ``pipe.generate`` (schedule,
    guidance_rescale, record, micro_batch, tiled, safe)."""
    from sd_jax.pipelines import conditioning, starts

    pipe.check_request(steps, guidance_scale)
    prompts = conditioning.prompt_list(prompts)
    key = jax.random.key(seed)
    start = starts.txt2img(pipe, key, len(prompts), height, width, noise) if start is None else start
    return pipe.generate(start, prompts, negative, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                         clip_skip=clip_skip, ip_adapter_image=ip_image, ip_adapter_image_embeds=ip_embeds,
                         key=jax.random.fold_in(key, 2), **generate_kw)  # fmt: skip
