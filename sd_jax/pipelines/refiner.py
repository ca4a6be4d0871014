"""The SDXL ensemble of experts (Podell et al. 2023, section 2.5; diffusers' ``denoising_end`` /
``denoising_start``): the base samples the high-noise part and hands its latents to the refiner, which finishes.

:func:`refine` is two calls of the pipeline's own modes, nothing more: ``base.txt2img(..., denoising_end=switch,
output_type="latent")`` then ``refiner.img2img(prompts, latents, denoising_start=switch, aesthetic_score=...)``.
:func:`model_kind` tells a base from a refiner from its files without loading weights, so a CLI can refuse a wrong
pair before any model loads; :func:`check_pair` checks loaded pipelines.
"""

from __future__ import annotations

import pathlib

import numpy as np

from sd_jax.errors import SDJaxError

REFINER, BASE = "sdxl_refiner", "sdxl"


class RefinerError(SDJaxError, ValueError):
    """A refiner that is not an SDXL refiner, or a base that is not SDXL."""


def model_kind(path) -> str | None:
    """``"sdxl"``, ``"sdxl_refiner"``, another architecture's name, or None when the files cannot say without loading
    (a Hub id, a pickle): from a folder's ``model_index.json`` or a ``.safetensors`` header's keys and shapes."""
    p = pathlib.Path(str(path))
    if p.is_dir():
        from sd_jax.loading.diffusers import read_json

        if not (p / "model_index.json").is_file():
            return None
        index = read_json(p / "model_index.json")
        has = {n for n in ("text_encoder", "text_encoder_2") if index.get(n) and index[n][0] is not None}
        if has == {"text_encoder_2"}:
            return REFINER
        return BASE if has == {"text_encoder", "text_encoder_2"} else index.get("_class_name", "not SDXL")
    if p.is_file() and p.suffix == ".safetensors":
        from sd_jax.convert.single_file_detect import detect_architecture
        from sd_jax.loading.safetensors_io import read_header

        header, _ = read_header(p)
        shapes = {k: np.broadcast_to(np.zeros((), np.int8), v["shape"]) for k, v in header.items()
                  if k != "__metadata__"}  # fmt: skip
        try:
            return detect_architecture(shapes)
        except SDJaxError as e:
            return str(e)
    return None


def _what(kind: str) -> str:
    return {REFINER: "an SDXL refiner", BASE: "an SDXL base model"}.get(kind, f"not SDXL ({kind})")


def check_refiner_path(path, base_path=None) -> None:
    """Refuse, naming the path, a refiner that its files show is no SDXL refiner, and a base that is no SDXL base."""
    kind = model_kind(path)
    if kind is not None and kind != REFINER:
        raise RefinerError(f"{path} is {_what(kind)}, not an SDXL refiner (text_encoder_2 alone, aesthetic-score "
                           "time ids) ; pass a refiner such as stable-diffusion-xl-refiner-1.0")  # fmt: skip
    if base_path is not None:
        kind = model_kind(base_path)
        if kind is not None and kind != BASE:
            raise RefinerError(f"the refiner continues an SDXL base model, but {base_path} is {_what(kind)} ; "
                               "pass an SDXL base as the model or drop the refiner")  # fmt: skip


def check_pair(base, refiner, base_name: str = "the base", refiner_name: str = "the refiner") -> None:
    """The loaded pipelines: an SDXL base and an SDXL refiner sharing one latent space."""
    if not refiner.components.refiner or not refiner.components.requires_aesthetics_score:
        kind = BASE if refiner.is_sdxl else refiner.pipeline_class or "not SDXL"
        raise RefinerError(f"{refiner_name} is {_what(kind)}, not an SDXL refiner ; pass the refiner")
    if not base.is_sdxl or base.components.refiner:
        kind = REFINER if base.components.refiner else base.pipeline_class or "not SDXL"
        raise RefinerError(f"the refiner continues an SDXL base model, but {base_name} is {_what(kind)}")
    if base.latent_channels != refiner.latent_channels or base.vae_scale_factor != refiner.vae_scale_factor:
        raise RefinerError(f"{base_name} and {refiner_name} have different latent spaces (VAE channels/factor)")


def refine(base, refiner, prompts, *, switch: float = 0.8, negative=None, steps: int = 20, sampler=None,
           refiner_sampler=None, schedule: str = "default", guidance_scale: float = 7.5, seed: int = 0, noise=None,
           height=None, width=None, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
           tiled=None, **kw):  # fmt: skip
    """Images from ``base`` up to ``switch`` of the schedule and ``refiner`` from there (same steps, seed and
    sampler unless ``refiner_sampler``), as diffusers' base ``denoising_end`` + refiner ``denoising_start``.
    ``kw``: txt2img options for both passes (``guidance_rescale``, ``clip_skip``)."""
    check_pair(base, refiner)
    common = dict(negative=negative, steps=steps, schedule=schedule, guidance_scale=guidance_scale, seed=seed, **kw)
    latents, _ = base.txt2img(prompts, height=height, width=width, noise=noise, sampler=sampler,
                              denoising_end=switch, output_type="latent", **common)  # fmt: skip
    images, _ = refiner.img2img(prompts, latents, denoising_start=switch, tiled=tiled, aesthetic_score=aesthetic_score,
                                negative_aesthetic_score=negative_aesthetic_score,
                                sampler=sampler if refiner_sampler is None else refiner_sampler, **common)  # fmt: skip
    return images
