"""The pipeline's modes: each checks its request, builds its :class:`~sd_jax.pipelines.starts.Start` and hands it
to :meth:`StableDiffusion.generate <sd_jax.pipelines.pipeline.StableDiffusion.generate>`. ``ImageModes`` is mixed
into :class:`~sd_jax.pipelines.pipeline.StableDiffusion`.

Common options of every mode: ``sampler`` (None: the folder's own scheduler, ``default_sampler``), ``schedule``
(the grid's schedule type), ``tiled`` (VAE tiling: None auto, True/False forced) and, for txt2img, img2img and
inpaint, ``guidance_rescale`` and ``clip_skip`` (applied to the prompt and the negative prompt alike, as A1111;
diffusers applies it to the prompt only). Each returns ``(images [N, H, W, 3] in [0, 1], extra)``.

With ControlNets loaded (:mod:`sd_jax.pipelines.controlnet`), txt2img, img2img and inpaint take diffusers'
ControlNet arguments: ``control_image`` (one per net: a file, PIL image, array, or an [N, H, W, C] batch; txt2img
also takes diffusers' name ``image``), ``controlnet_conditioning_scale``, ``control_guidance_start``,
``control_guidance_end`` (one number or one per net) and ``guess_mode``. Control images are resized to the output
size; txt2img without height/width takes the first control image's size.

SDXL's ensemble of experts (diffusers' names): txt2img, img2img and inpaint take ``denoising_end`` (stop at that
fraction of the schedule) and ``output_type="latent"`` (return the latents undecoded); img2img takes
``denoising_start`` (continue a base's latents from there, ``strength`` unused) and, like diffusers' refiner
pipeline, ``aesthetic_score`` / ``negative_aesthetic_score`` for a refiner (``requires_aesthetics_score``), as do
txt2img and inpaint. ``image`` may be latents ``[N, h, w, 4]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.pipelines import controlnet, starts
from sd_jax.pipelines.conditioning import prompt_list


def seed_keys(seed: int):
    """A seed's two keys: the start's draws, the sampler's (every mode, and the server's per-image rows)."""
    key = jax.random.key(seed)
    return key, jax.random.fold_in(key, 2)


_keys = seed_keys


OUTPUT_TYPES = ("np", "latent")


@contextlib.contextmanager
def latent_output(pipe, output_type: str | None = "latent"):
    """Within it (``output_type="latent"``) the pipeline's modes return their final latents undecoded
    (``generate``'s ``output_latents``); ``"np"`` or None: images."""
    if output_type not in (None, *OUTPUT_TYPES):
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    before = pipe.output_latents
    pipe.output_latents = before or output_type == "latent"
    try:
        yield
    finally:
        pipe.output_latents = before


def _experts(pipe, start, grid, denoising_end, aesthetic_score, negative_aesthetic_score):
    """The start with the refiner's aesthetic time ids and the ``denoising_end`` step."""
    start = starts.micro_conditioning(pipe, start, aesthetic_score, negative_aesthetic_score)
    return dataclasses.replace(start, end=starts.end_step(pipe, grid, denoising_end))


class ImageModes:
    """Mixin: the public modes (see the module docstring)."""

    def _generate_as(self, start, grid, experts, output_type, prompts, negative, **kw):
        """``generate`` from ``start`` with ``experts`` = (denoising_end, aesthetic_score, negative_aesthetic_score)
        applied (:func:`_experts`), returning latents for ``output_type="latent"``."""
        start = _experts(self, start, grid, *experts)
        with latent_output(self, output_type):
            return self.generate(start, prompts, negative, **kw)

    def txt2img(self, prompts, *, negative=None, height=None, width=None, steps=20, sampler=None,
                schedule="default", guidance_scale=7.5, guidance_rescale=0.0, seed=0, noise=None, record=False,
                micro_batch=None, clip_skip=None, tiled=None, image=None, control_image=None,
                controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0,
                guess_mode=False, ip_adapter_image=None, denoising_end=None, output_type=None, aesthetic_score=6.0,
                negative_aesthetic_score=2.5):  # fmt: skip
        """Text to images; ``extra`` is the per-step x0 latents with ``record``, else None."""
        self.check_request(steps, guidance_scale)
        starts.check_split(self, sampler, steps, schedule, denoising_end)
        if image is not None and control_image is not None:
            raise ValueError("txt2img takes the control image as image= or control_image=, not both")
        ctl = controlnet.request(self, control_image if image is None else image, controlnet_conditioning_scale,
                                 control_guidance_start, control_guidance_end, guess_mode)  # fmt: skip
        if ctl is not None and height is None and width is None:
            height, width = controlnet.default_size(self, ctl)
        prompts = prompt_list(prompts)
        key, sample_key = _keys(seed)
        start = dataclasses.replace(starts.txt2img(self, key, len(prompts), height, width, noise), control=ctl)
        grid = self._grid(sampler, steps, schedule) if denoising_end is not None else None
        experts = (denoising_end, aesthetic_score, negative_aesthetic_score)
        return self._generate_as(start, grid, experts, output_type, prompts, negative, steps=steps, sampler=sampler,
                                 schedule=schedule, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                 clip_skip=clip_skip, key=sample_key, record=record, micro_batch=micro_batch,
                                 tiled=tiled, ip_adapter_image=ip_adapter_image)  # fmt: skip

    def img2img(self, prompts, image, *, strength=0.8, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=7.5, guidance_rescale=0.0, seed=0, noise=None, init_latents=None, clip_skip=None,
                tiled=None, control_image=None, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                control_guidance_end=1.0, guess_mode=False, ip_adapter_image=None, denoising_start=None,
                denoising_end=None, output_type=None, aesthetic_score=6.0, negative_aesthetic_score=2.5):  # fmt: skip
        """SDEdit (Meng et al. 2022): noise the image's latents to ``strength`` and denoise from there; with
        ``denoising_start``, continue a base's latents (:func:`sd_jax.pipelines.starts.img2img`)."""
        self.check_request(steps, guidance_scale)
        starts.check_split(self, sampler, steps, schedule, denoising_start, denoising_end)
        ctl = controlnet.request(self, control_image, controlnet_conditioning_scale, control_guidance_start,
                                 control_guidance_end, guess_mode)  # fmt: skip
        prompts = prompt_list(prompts)
        key, sample_key = _keys(seed)
        grid = self._grid(sampler, steps, schedule)
        start = starts.img2img(self, key, len(prompts), image, grid, strength, noise, init_latents, tiled,
                               denoising_start)  # fmt: skip
        start = dataclasses.replace(start, control=ctl)
        experts = (denoising_end, aesthetic_score, negative_aesthetic_score)
        images, _ = self._generate_as(start, grid, experts, output_type, prompts, negative, steps=steps,
                                      sampler=sampler, schedule=schedule, guidance_scale=guidance_scale,
                                      guidance_rescale=guidance_rescale, clip_skip=clip_skip, key=sample_key,
                                      tiled=tiled, ip_adapter_image=ip_adapter_image)  # fmt: skip
        return images, None

    def inpaint(self, prompts, image, mask, *, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=7.5, guidance_rescale=0.0, seed=0, noise=None, strength=1.0, image_latents=None,
                masked_image_latents=None, clip_skip=None, tiled=None, control_image=None,
                controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0,
                guess_mode=False, ip_adapter_image=None, denoising_end=None, output_type=None, aesthetic_score=6.0,
                negative_aesthetic_score=2.5, masked_content="original"):  # fmt: skip
        """Repaint where ``mask`` is 1 ([H, W, 1] or [N, H, W, 1]); see :func:`sd_jax.pipelines.starts.inpaint`
        (``masked_content``: ``original``, ``fill``, ``latent_noise``, ``latent_nothing``; A1111's)."""
        self.check_request(steps, guidance_scale)
        starts.check_split(self, sampler, steps, schedule, denoising_end)
        ctl = controlnet.request(self, control_image, controlnet_conditioning_scale, control_guidance_start,
                                 control_guidance_end, guess_mode)  # fmt: skip
        prompts = prompt_list(prompts)
        key, sample_key = _keys(seed)
        grid = self._grid(sampler, steps, schedule)
        start = starts.inpaint(self, key, len(prompts), image, mask, grid, strength, noise, image_latents,
                               masked_image_latents, tiled, masked_content)  # fmt: skip
        start = dataclasses.replace(start, control=ctl)
        experts = (denoising_end, aesthetic_score, negative_aesthetic_score)
        images, _ = self._generate_as(start, grid, experts, output_type, prompts, negative, steps=steps,
                                      sampler=sampler, schedule=schedule, guidance_scale=guidance_scale,
                                      guidance_rescale=guidance_rescale, clip_skip=clip_skip, key=sample_key,
                                      tiled=tiled, ip_adapter_image=ip_adapter_image)  # fmt: skip
        return images, None

    def upscale(self, prompts, image, *, noise_level=20, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=9.0, seed=0, noise=None, image_noise=None, tiled=None):  # fmt: skip
        """x4 upscaling: the noised low-res image is concatenated to the latents; its noise level is the class label."""
        starts.check_upscale(self, noise_level)
        self.check_request(steps, guidance_scale)
        prompts = prompt_list(prompts)
        key, sample_key = _keys(seed)
        start = starts.upscale(self, key, len(prompts), image, noise_level, noise, image_noise)
        images, _ = self.generate(start, prompts, negative, steps=steps, sampler=sampler, schedule=schedule,
                                  guidance_scale=guidance_scale, key=sample_key, tiled=tiled)  # fmt: skip
        return images, None

    def estimate_latent_noise(self, image, key) -> float:
        """:func:`sd_jax.pipelines.starts.estimate_latent_noise`."""
        return starts.estimate_latent_noise(self, image, key)

    def denoise(self, prompts, image, *, noise_level=None, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=3.0, seed=0, tiled=None):  # fmt: skip
        """Restore a noisy or damaged photo by partial diffusion from its (given or estimated) latent noise level
        (a latent-space sigma; see :func:`sd_jax.pipelines.starts.denoise`)."""
        self.check_request(steps, guidance_scale)
        prompts = prompt_list(prompts)
        key, sample_key = _keys(seed)
        grid = self._grid(sampler, steps, schedule)
        start, level = starts.denoise(self, key, len(prompts), image, grid, noise_level, tiled)
        start = starts.micro_conditioning(self, start)  # a refiner's aesthetic time ids (diffusers' defaults)
        images, _ = self.generate(start, prompts, negative, steps=steps, sampler=sampler, schedule=schedule,
                                  guidance_scale=guidance_scale, key=sample_key, tiled=tiled)  # fmt: skip
        return images, {"noise_level": level, "start_step": start.step}

    def interpolate(self, prompt_a, prompt_b=None, *, frames=8, seed_a=0, seed_b=1, height=None, width=None,
                    steps=20, sampler=None, schedule="default", guidance_scale=7.5, tiled=None):  # fmt: skip
        """Frames along slerp paths between two seeds' noise and (optionally) two prompts' embeddings."""
        self.check_request(steps, guidance_scale)
        start = starts.interpolation(self, prompt_a, prompt_b, frames, seed_a, seed_b, guidance_scale, height, width)
        start = starts.micro_conditioning(self, start)
        images, _ = self.generate(start, [prompt_a] * frames, steps=steps, sampler=sampler, schedule=schedule,
                                  guidance_scale=guidance_scale, key=jax.random.key(0), tiled=tiled)  # fmt: skip
        return images, None

    def progression(self, prompt, *, at: Sequence[int] | None = None, steps=20, sampler=None, seed=0, tiled=None,
                    **kw):  # fmt: skip
        """The predicted x0 at chosen steps (default: 8 evenly spaced), decoded: the image emerging from noise.

        ``kw`` are txt2img's options (``schedule``, ``guidance_scale``, ``clip_skip``, ...)."""
        at = list(at) if at is not None else sorted(set(np.linspace(0, steps - 1, min(8, steps)).round().astype(int)))
        if any(not 0 <= i < steps for i in at):
            raise ValueError(f"progression steps {at} must lie in [0, {steps})")
        _, ds = self.txt2img([prompt], steps=steps, sampler=sampler, seed=seed, record=True, **kw)
        return self.decode(jnp.concatenate([ds[i] for i in at]), tiled=tiled, safe=False), at
