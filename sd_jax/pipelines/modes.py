"""The pipeline's modes beyond txt2img: different starts and conditionings around the same loop.

img2img, inpaint, upscale, denoise, interpolation and progression each build a start point (a noised latent, a
blend mask, a concatenated low-res image, ...) and call :meth:`StableDiffusion.latents`; ``ImageModes`` is
mixed into :class:`~sd_jax.pipelines.pipeline.StableDiffusion`, whose construction, loop and VAE they use.

Common options of every mode: ``sampler`` (None: the folder's own scheduler), ``schedule`` (schedule type),
``tiled`` (VAE tiling: None auto, True/False forced); img2img and inpaint also take ``guidance_rescale`` and
``clip_skip`` (applied to the prompt and the negative prompt alike, as A1111; diffusers applies it to the prompt
only).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.pipelines.loop import Options
from sd_jax.schedules import NoiseSchedule


class ImageModes:
    """Mixin: the modes other than txt2img (see the module docstring)."""

    def _start(self, steps: int, strength: float) -> int:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        return steps - min(int(steps * strength), steps)

    def img2img(self, prompts, image, *, strength=0.8, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=7.5, guidance_rescale=0.0, seed=0, noise=None, init_latents=None, clip_skip=None,
                tiled=None):  # fmt: skip
        """SDEdit (Meng et al. 2022): noise the image's latents to ``strength`` and denoise from there."""
        self.check_request(steps, guidance_scale)
        sampler = self._sampler(sampler)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        key = jax.random.key(seed)
        image = self.as_image(image, "image")
        if image.ndim == 3:
            image = jnp.broadcast_to(image, (len(prompts), *image.shape))
        h, w = image.shape[1], image.shape[2]
        self.check_size(h, w)
        z0 = (
            self.encode(image, jax.random.fold_in(key, 3), tiled=tiled)
            if init_latents is None
            else jnp.asarray(init_latents)
        )
        start = self._start(steps, strength)
        sigmas = self._grid(sampler, steps, schedule).sigmas
        noise = self._noise(jax.random.fold_in(key, 1), len(prompts), h, w) if noise is None else noise
        negative = [negative] * len(prompts) if isinstance(negative, str) else negative
        cond, uncond = self.conditioning(prompts, negative, guidance_scale, h, w, clip_skip)
        if start >= steps:  # strength 0: nothing to do
            return self.decode(z0, tiled=tiled), None
        x_start = z0 + sigmas[start] * noise
        opts = Options(sampler=sampler, steps=steps, schedule=schedule, start=start)
        lat, _ = self.latents(noise, cond, uncond, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                              key=jax.random.fold_in(key, 2), opts=opts, x_start=x_start)  # fmt: skip
        return self.decode(lat, tiled=tiled), None

    def inpaint(self, prompts, image, mask, *, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=7.5, guidance_rescale=0.0, seed=0, noise=None, strength=1.0, image_latents=None,
                masked_image_latents=None, clip_skip=None, tiled=None):  # fmt: skip
        """Repaint where ``mask`` is 1 ([H, W, 1] or [N, H, W, 1]).

        A 9-channel inpainting U-Net gets the mask and the masked image's latents
        as extra input channels; any other U-Net inpaints by blending the known
        latents back after every step (diffusers' ``StableDiffusionInpaintPipeline`` does both).
        """
        self.check_request(steps, guidance_scale)
        sampler = self._sampler(sampler)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = len(prompts)
        key = jax.random.key(seed)
        image = self.as_image(image, "image")
        mask = self.as_image(mask, "mask")
        image = jnp.broadcast_to(image, (n, *image.shape[-3:]))
        mask = jnp.broadcast_to(mask, (n, *mask.shape[-3:]))
        h, w = image.shape[1], image.shape[2]
        self.check_size(h, w)
        if mask.shape[1:3] != (h, w):
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[2]} but the image is {h}x{w}")
        mask = (mask >= 0.5).astype(jnp.float32)  # binarized, as diffusers' mask processor
        f = self.vae_scale_factor
        small = _nearest(mask, h // f, w // f)
        sigmas = self._grid(sampler, steps, schedule).sigmas
        noise = self._noise(jax.random.fold_in(key, 1), n, h, w) if noise is None else noise
        negative = [negative] * n if isinstance(negative, str) else negative
        cond, uncond = self.conditioning(prompts, negative, guidance_scale, h, w, clip_skip)
        start = self._start(steps, strength)
        z0 = None
        if not self.is_inpaint_unet or strength < 1.0:
            z0 = (
                self.encode(image, jax.random.fold_in(key, 3), tiled=tiled)
                if image_latents is None
                else jnp.asarray(image_latents)
            )
        x_start = None if strength >= 1.0 else z0 + sigmas[start] * noise
        opts = Options(sampler=sampler, steps=steps, schedule=schedule, start=start)
        guide = dict(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, key=jax.random.fold_in(key, 2))
        if self.is_inpaint_unet:
            if masked_image_latents is None:
                # diffusers zeroes the masked pixels in [-1, 1], i.e. mid-gray
                masked = image * (1 - mask) + 0.5 * mask
                masked_image_latents = self.encode(masked, jax.random.fold_in(key, 4), tiled=tiled)
            extra = jnp.concatenate([small, jnp.asarray(masked_image_latents)], axis=-1)
            cond = dict(cond, concat=extra)
            if uncond is not None:
                uncond = dict(uncond, concat=extra)
            lat, _ = self.latents(noise, cond, uncond, opts=opts, x_start=x_start, **guide)
        else:
            lat, _ = self.latents(noise, cond, uncond, opts=opts, x_start=x_start, x0=z0, mask=small, **guide)
        return self.decode(lat, tiled=tiled), None

    def upscale(self, prompts, image, *, noise_level=20, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=9.0, seed=0, noise=None, image_noise=None, tiled=None):  # fmt: skip
        """x4 upscaling: the noised low-res image is concatenated to the latents; its noise level is the class label."""
        if not self.is_upscaler:
            raise ValueError(
                f"{self.source}: upscaling needs an x4 upscaler checkpoint (a U-Net with num_class_embeds)"
            )
        if noise_level > self.max_noise_level:
            raise ValueError(f"noise_level {noise_level} exceeds the model's max_noise_level {self.max_noise_level}")
        self.check_request(steps, guidance_scale)
        sampler = self._sampler(sampler)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = len(prompts)
        key = jax.random.key(seed)
        image = self.as_image(image, "image")
        image = jnp.broadcast_to(image, (n, *image.shape[-3:])) * 2 - 1
        h, w = image.shape[1], image.shape[2]
        low = self.low_res_schedule or NoiseSchedule(beta_start=0.0001, beta_end=0.02)
        ac = float(low.alphas_cumprod()[noise_level])
        if image_noise is None:
            image_noise = jax.random.normal(jax.random.fold_in(key, 5), image.shape)
        noised = np.sqrt(ac) * image + np.sqrt(1 - ac) * image_noise
        labels = jnp.full((n,), noise_level, jnp.int32)
        cond, uncond = self.conditioning(prompts, [negative] * n if isinstance(negative, str) else negative,
                                         guidance_scale, h, w)  # fmt: skip
        cond = dict(cond, concat=noised, class_labels=labels)
        if uncond is not None:
            uncond = dict(uncond, concat=noised, class_labels=labels)
        if noise is None:
            noise = jax.random.normal(jax.random.fold_in(key, 1), (n, h, w, self.latent_channels))
        lat, _ = self.latents(noise, cond, uncond, guidance_scale=guidance_scale, key=jax.random.fold_in(key, 2),
                              opts=Options(sampler=sampler, steps=steps, schedule=schedule))  # fmt: skip
        return self.decode(lat, tiled=tiled), None

    def estimate_latent_noise(self, image, key) -> float:
        """The latent-space noise level of a noisy photo: pixel noise (MAD of a Laplacian, Donoho 1995) pushed
        through the encoder by re-noising the image with that much fresh noise and measuring the latent change."""
        img = np.asarray(image, np.float32)
        gray = img.mean(-1)
        lap = (
            gray[..., 2:, 1:-1]
            + gray[..., :-2, 1:-1]
            + gray[..., 1:-1, 2:]
            + gray[..., 1:-1, :-2]
            - 4 * gray[..., 1:-1, 1:-1]
        )
        sigma_pix = float(np.median(np.abs(lap)) / 0.6745 / np.sqrt(20.0))
        z = self.encode(img)
        z2 = self.encode(np.clip(img + sigma_pix * np.asarray(jax.random.normal(key, img.shape)), 0, 1))
        return float(jnp.std(z2 - z))

    def denoise(self, prompts, image, *, noise_level=None, negative=None, steps=20, sampler=None, schedule="default",
                guidance_scale=3.0, seed=0, tiled=None):  # fmt: skip
        """Restore a noisy or damaged photo by partial diffusion from its (given or estimated) latent noise level.

        The encoded image is treated as the sample at the first grid sigma at or below
        ``noise_level`` (a latent-space sigma); no extra noise is added.
        """
        self.check_request(steps, guidance_scale)
        sampler = self._sampler(sampler)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        key = jax.random.key(seed)
        image = self.as_image(image, "image")
        image = jnp.broadcast_to(image, (len(prompts), *image.shape[-3:]))
        h, w = image.shape[1], image.shape[2]
        self.check_size(h, w)
        if noise_level is None:
            noise_level = self.estimate_latent_noise(image, jax.random.fold_in(key, 6))
        sigmas = self._grid(sampler, steps, schedule).sigmas
        below = np.nonzero(sigmas[:-1] <= noise_level)[0]
        start = int(below[0]) if len(below) else steps - 1
        z = self.encode(image, tiled=tiled)
        cond, uncond = self.conditioning(prompts, [negative] * len(prompts) if isinstance(negative, str) else negative,
                                         guidance_scale, h, w)  # fmt: skip
        noise = jnp.zeros_like(z)
        lat, _ = self.latents(noise, cond, uncond, guidance_scale=guidance_scale, key=jax.random.fold_in(key, 2),
                              opts=Options(sampler=sampler, steps=steps, schedule=schedule, start=start),
                              x_start=z)  # fmt: skip
        return self.decode(lat, tiled=tiled), {"noise_level": float(noise_level), "start_step": start}

    def interpolate(self, prompt_a, prompt_b=None, *, frames=8, seed_a=0, seed_b=1, height=None, width=None,
                    steps=20, sampler=None, schedule="default", guidance_scale=7.5, tiled=None):  # fmt: skip
        """Frames along slerp paths between two seeds' noise and (optionally) two prompts' embeddings."""
        from sd_jax.pipelines.interpolate import slerp

        self.check_request(steps, guidance_scale)
        sampler = self._sampler(sampler)

        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_size(height, width)
        na = self._noise(jax.random.fold_in(jax.random.key(seed_a), 1), 1, height, width)[0]
        nb = self._noise(jax.random.fold_in(jax.random.key(seed_b), 1), 1, height, width)[0]
        ts = np.linspace(0.0, 1.0, frames)
        noise = jnp.stack([slerp(na, nb, t) for t in ts])
        ca, ua = self.conditioning([prompt_a], None, guidance_scale, height, width)
        cb, _ = self.conditioning([prompt_b or prompt_a], None, guidance_scale, height, width)
        cond = {k: jnp.concatenate([slerp(ca[k][0], cb[k][0], t)[None] for t in ts]) for k in ca}
        uncond = None if ua is None else jax.tree.map(lambda a: jnp.repeat(a, frames, axis=0), ua)
        lat, _ = self.latents(noise, cond, uncond, guidance_scale=guidance_scale,
                              opts=Options(sampler=sampler, steps=steps, schedule=schedule))  # fmt: skip
        return self.decode(lat, tiled=tiled), None

    def progression(self, prompt, *, at: Sequence[int] | None = None, steps=20, sampler=None, seed=0, tiled=None,
                    **kw):  # fmt: skip
        """The predicted x0 at chosen steps (default: 8 evenly spaced), decoded: the image emerging from noise.

        ``kw`` are txt2img's options (``schedule``, ``guidance_scale``, ``clip_skip``, ...)."""
        at = list(at) if at is not None else sorted(set(np.linspace(0, steps - 1, min(8, steps)).round().astype(int)))
        if any(not 0 <= i < steps for i in at):
            raise ValueError(f"progression steps {at} must lie in [0, {steps})")
        _, ds = self.txt2img([prompt], steps=steps, sampler=sampler, seed=seed, record=True, **kw)
        return self.decode(jnp.concatenate([ds[i] for i in at]), tiled=tiled, safe=False), at


def _nearest(mask, h, w):
    """``F.interpolate(mask, size=(h, w))`` (nearest) in NHWC."""
    from sd_jax.models.unet_blocks import upsample_nearest

    return upsample_nearest(mask, (h, w))
