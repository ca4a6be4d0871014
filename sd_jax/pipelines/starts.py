"""Where each mode starts sampling: one small function per mode returns a :class:`Start`, which
:meth:`StableDiffusion.generate <sd_jax.pipelines.pipeline.StableDiffusion.generate>` turns into images.

A start is the initial noise, the first grid step and the latent there, the extra conditioning the U-Net takes
(an inpainting U-Net's mask and masked image, the upscaler's low-res image and noise level) and, for inpainting
with an ordinary U-Net, the known latents and the mask they are blended back under. Random draws come from
``fold_in(key(seed), i)``: 1 the start noise, 3 the image's posterior sample, 4 the masked image's, 5 the
upscaler's image noise, 6 the denoiser's noise estimate (2 is the sampler's own).

The SDXL ensemble of experts (diffusers' ``denoising_end`` / ``denoising_start``) is a start too: the base stops
at :func:`~sd_jax.sampling.registry.cutoff_step` (``Start.end``) and returns its latents, and the refiner's
img2img starts at that step from them, adding no noise (:func:`img2img` with ``denoising_start``). The refiner's
aesthetic-score time ids are extra conditioning (:func:`micro_conditioning`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import components as C
from sd_jax.pipelines import masked_content as MC
from sd_jax.pipelines.interpolate import slerp
from sd_jax.sampling.registry import Grid, cutoff_step, start_from
from sd_jax.schedules import NoiseSchedule


@dataclasses.dataclass(frozen=True)
class Start:
    noise: jax.Array  # [N, h, w, C] unit noise: the sampler's start, and what img2img/inpaint noise x0 with
    size: tuple[int, int]  # (height, width) in pixels, for SDXL's micro-conditioning
    step: int = 0  # first grid step; the step count itself means nothing to sample: x_start is the result
    x_start: jax.Array | None = None  # the VE latent at sigmas[step] (None: noise at the grid's first sigma)
    extra: dict = dataclasses.field(default_factory=dict)  # added to cond and uncond: concat, class_labels
    x0: jax.Array | None = None  # known latents kept where mask == 0 (inpainting with a 4-channel U-Net)
    mask: jax.Array | None = None  # [N, h, w, 1], 1 = repaint
    cond: tuple | None = None  # precomputed (cond, uncond) in place of the prompts' (interpolation)
    control: object = None  # a checked ControlNet request (pipelines.controlnet.Request), or None
    end: int | None = None  # stop before this grid step and return its latent (denoising_end), None: the end
    uncond_extra: dict = dataclasses.field(default_factory=dict)  # added to uncond only, after extra


def _noise(pipe, key, n: int, height: int, width: int):
    f = pipe.vae_scale_factor
    return jax.random.normal(key, (n, height // f, width // f, pipe.latent_channels), jnp.float32)


def _batch(pipe, image, n: int, what: str = "image"):
    image = pipe.as_image(image, what)
    return jnp.broadcast_to(image, (n, *image.shape[-3:]))


def default_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or native, width or native
    pipe.check_size(height, width)
    return height, width


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def txt2img(pipe, key, n: int, height=None, width=None, noise=None) -> Start:
    """Pure noise at the first step."""
    height, width = default_size(pipe, height, width)
    noise = _noise(pipe, jax.random.fold_in(key, 1), n, height, width) if noise is None else noise
    return Start(noise=noise, size=(height, width))


def is_latents(pipe, image) -> bool:
    """An ``[N, h, w, latent_channels]`` array (a base's ``output_type="latent"``) rather than an RGB image; as
    diffusers' img2img takes a 4-channel ``image`` as latents."""
    shape = np.shape(image)
    return len(shape) == 4 and shape[-1] == pipe.latent_channels and shape[-1] != 3


ORDER_TWO = ("heun",)  # diffusers' order-2 schedulers repeat each timestep: their split falls mid-step


def check_split(pipe, sampler, steps: int, schedule: str, *fractions) -> None:
    """Refuse ``denoising_start``/``denoising_end`` with a sampler whose diffusers split our grid cannot take."""
    if all(f is None for f in fractions):
        return
    name = pipe.plan(pipe._sampler(sampler), steps, schedule)[0].sampler
    if name in ORDER_TWO:
        raise ValueError(f"denoising_start/denoising_end with {name}: diffusers' order-2 {name} splits inside a step, "
                         "which this grid cannot ; use euler, dpmpp_2m, unipc or ddim for the handoff")  # fmt: skip


def end_step(pipe, grid: Grid, denoising_end: float | None) -> int | None:
    """The step a ``denoising_end`` run stops before (None: it runs to the end)."""
    if denoising_end is None:
        return None
    return cutoff_step(grid, denoising_end, pipe.components.schedule.num_train_timesteps)


def img2img(pipe, key, n: int, image, grid: Grid, strength: float, noise=None, init_latents=None, tiled=None,
            denoising_start: float | None = None) -> Start:  # fmt: skip
    """SDEdit (Meng et al. 2022): the image's latents noised to ``strength``, as diffusers' img2img.

    ``image`` may be latents (:func:`is_latents`). With ``denoising_start`` (diffusers'
    ``StableDiffusionXLImg2ImgPipeline``), ``strength`` is unused: sampling starts at the
    :func:`~sd_jax.sampling.registry.cutoff_step` of that fraction from the latents as they are (a base's
    ``denoising_end`` output: VE for the Euler family, else VP, as diffusers hands them over), no noise added.
    """
    if init_latents is None and is_latents(pipe, image):
        init_latents = image
    if init_latents is not None:
        z0 = jnp.asarray(init_latents)
        z0 = jnp.broadcast_to(z0, (n, *z0.shape[-3:]))
        f = pipe.vae_scale_factor
        h, w = z0.shape[1] * f, z0.shape[2] * f
    else:
        image = _batch(pipe, image, n)
        h, w = image.shape[1], image.shape[2]
    pipe.check_size(h, w)
    noise = _noise(pipe, jax.random.fold_in(key, 1), n, h, w) if noise is None else noise
    if init_latents is None:
        z0 = pipe.encode(image, jax.random.fold_in(key, 3), tiled=tiled)
    if denoising_start is not None:
        step = cutoff_step(grid, denoising_start, pipe.components.schedule.num_train_timesteps)
        x_start = z0 if grid.ve_output else z0 * float(np.sqrt(grid.sigmas[step] ** 2 + 1))
        return Start(noise=noise, size=(h, w), step=step, x_start=x_start)
    check_strength(strength)
    step, x_start = start_from(grid, strength, z0, noise)
    return Start(noise=noise, size=(h, w), step=step, x_start=x_start)


def micro_conditioning(pipe, start: Start, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                       original_size=None, crops_coords_top_left=(0, 0)) -> Start:  # fmt: skip
    """The refiner's time ids (``requires_aesthetics_score``): original size, crop, and ``aesthetic_score`` for the
    prompt, ``negative_aesthetic_score`` for the negative side, as diffusers'
    ``StableDiffusionXLImg2ImgPipeline._get_add_time_ids``; other models' starts are returned as they are."""
    if not pipe.components.requires_aesthetics_score:
        return start
    n = start.noise.shape[0]
    size = np.broadcast_to(np.asarray(original_size or start.size, np.float32), (n, 2))
    ids = C.refiner_time_ids(size, crops_coords_top_left, aesthetic_score)
    neg = C.refiner_time_ids(size, crops_coords_top_left, negative_aesthetic_score)
    return dataclasses.replace(start, extra={**start.extra, "time_ids": ids}, uncond_extra={"time_ids": neg})


def _nearest(mask, h, w):
    """``F.interpolate(mask, size=(h, w))`` (nearest) in NHWC."""
    from sd_jax.models.unet_blocks import upsample_nearest

    return upsample_nearest(mask, (h, w))


def inpaint(pipe, key, n: int, image, mask, grid: Grid, strength: float = 1.0, noise=None, image_latents=None,
            masked_image_latents=None, tiled=None, masked_content: str = "original") -> Start:  # fmt: skip
    """Repaint where ``mask`` is 1, as diffusers' ``StableDiffusionInpaintPipeline``: a 9-channel inpainting U-Net
    gets the mask and the masked image's latents as extra input channels; any other U-Net keeps the known latents
    by blending them back after every step (and sub-step). ``masked_content``: what the init latents hold in the
    masked area (:mod:`sd_jax.pipelines.masked_content`, A1111's "Masked content")."""
    check_strength(strength)
    MC.check(masked_content)
    image, mask = _batch(pipe, image, n), _batch(pipe, mask, n, "mask")
    h, w = image.shape[1], image.shape[2]
    pipe.check_size(h, w)
    if mask.shape[1:3] != (h, w):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[2]} but the image is {h}x{w}")
    mask = (mask >= 0.5).astype(jnp.float32)  # binarized, as diffusers' mask processor
    f = pipe.vae_scale_factor
    small = _nearest(mask, h // f, w // f)
    noise = _noise(pipe, jax.random.fold_in(key, 1), n, h, w) if noise is None else noise
    z0 = None
    if not pipe.is_inpaint_unet or strength < 1.0:
        filled = image if masked_content == "original" else MC.fill(image, mask)
        z0 = pipe.encode(filled, jax.random.fold_in(key, 3), tiled=tiled) if image_latents is None else image_latents
        z0 = MC.latents(jnp.asarray(z0), noise, small, masked_content)
    step, x_start = start_from(grid, strength, z0, noise) if strength < 1.0 else (0, None)
    if not pipe.is_inpaint_unet:
        return Start(noise=noise, size=(h, w), step=step, x_start=x_start, x0=z0, mask=small)
    if masked_image_latents is None:
        masked = image * (1 - mask) + 0.5 * mask  # diffusers zeroes the masked pixels in [-1, 1]: mid-gray
        masked_image_latents = pipe.encode(masked, jax.random.fold_in(key, 4), tiled=tiled)
    extra = {"concat": jnp.concatenate([small, jnp.asarray(masked_image_latents)], axis=-1)}
    return Start(noise=noise, size=(h, w), step=step, x_start=x_start, extra=extra)


def check_upscale(pipe, noise_level: int) -> None:
    if not pipe.is_upscaler:
        raise ValueError(f"{pipe.source}: upscaling needs an x4 upscaler checkpoint (a U-Net with num_class_embeds)")
    if noise_level > pipe.max_noise_level:
        raise ValueError(f"noise_level {noise_level} exceeds the model's max_noise_level {pipe.max_noise_level}")


def upscale(pipe, key, n: int, image, noise_level: int, noise=None, image_noise=None) -> Start:
    """x4 upscaling (diffusers' ``StableDiffusionUpscalePipeline``): the low-res image, noised by the low-res
    scheduler to ``noise_level``, is concatenated to the latents; the noise level is the class label."""
    check_upscale(pipe, noise_level)
    image = _batch(pipe, image, n) * 2 - 1
    h, w = image.shape[1], image.shape[2]
    low = pipe.low_res_schedule or NoiseSchedule(beta_start=0.0001, beta_end=0.02)
    ac = float(low.alphas_cumprod()[noise_level])
    if image_noise is None:
        image_noise = jax.random.normal(jax.random.fold_in(key, 5), image.shape)
    noised = np.sqrt(ac) * image + np.sqrt(1 - ac) * image_noise
    if noise is None:
        noise = jax.random.normal(jax.random.fold_in(key, 1), (n, h, w, pipe.latent_channels))
    extra = {"concat": noised, "class_labels": jnp.full((n,), noise_level, jnp.int32)}
    return Start(noise=noise, size=(h, w), extra=extra)


def estimate_latent_noise(pipe, image, key) -> float:
    """The latent-space noise level of a noisy photo: pixel noise (MAD of a Laplacian, Donoho 1995) pushed through
    the encoder by re-noising the image with that much fresh noise and measuring the latent change."""
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
    z = pipe.encode(img)
    z2 = pipe.encode(np.clip(img + sigma_pix * np.asarray(jax.random.normal(key, img.shape)), 0, 1))
    return float(jnp.std(z2 - z))


def denoise(pipe, key, n: int, image, grid: Grid, noise_level: float | None = None, tiled=None):
    """Partial diffusion from the photo's own noise level: the encoded image (posterior mean) is the sample at the
    first grid sigma at or below ``noise_level`` (given, or :func:`estimate_latent_noise`); no noise is added.
    Returns ``(start, noise_level)``."""
    image = _batch(pipe, image, n)
    h, w = image.shape[1], image.shape[2]
    pipe.check_size(h, w)
    if noise_level is None:
        noise_level = estimate_latent_noise(pipe, image, jax.random.fold_in(key, 6))
    steps = len(grid.sigmas) - 1
    below = np.nonzero(grid.sigmas[:-1] <= noise_level)[0]
    step = int(below[0]) if len(below) else steps - 1
    z = pipe.encode(image, tiled=tiled)
    return Start(noise=jnp.zeros_like(z), size=(h, w), step=step, x_start=z), float(noise_level)


def interpolation(pipe, prompt_a: str, prompt_b: str | None, frames: int, seed_a: int, seed_b: int,
                  guidance_scale: float, height=None, width=None) -> Start:  # fmt: skip
    """Frames along slerp paths between two seeds' noise and two prompts' embeddings (White 2016)."""
    height, width = default_size(pipe, height, width)
    na = _noise(pipe, jax.random.fold_in(jax.random.key(seed_a), 1), 1, height, width)[0]
    nb = _noise(pipe, jax.random.fold_in(jax.random.key(seed_b), 1), 1, height, width)[0]
    ts = np.linspace(0.0, 1.0, frames)
    noise = jnp.stack([slerp(na, nb, t) for t in ts])
    # both prompts in one call: a long prompt and a short one are padded to the same number of chunks
    c, u = pipe.conditioning([prompt_a, prompt_b or prompt_a], None, guidance_scale, height, width)
    cond = {k: jnp.concatenate([slerp(c[k][0], c[k][1], t)[None] for t in ts]) for k in c}
    uncond = None if u is None else jax.tree.map(lambda a: jnp.repeat(a[:1], frames, axis=0), u)
    return Start(noise=noise, size=(height, width), cond=(cond, uncond))


def concat(parts: list[Start]) -> Start:
    """Several starts of one step, size and end as one batch (the server's batching): their arrays joined along
    the batch axis. Control requests and precomputed conditioning do not join."""
    first = parts[0]
    for p in parts[1:]:
        if (p.step, p.size, p.end) != (first.step, first.size, first.end):
            raise ValueError(f"starts of different steps/sizes do not batch: {(p.step, p.size, p.end)} vs "
                             f"{(first.step, first.size, first.end)}")  # fmt: skip
    if any(p.control is not None or p.cond is not None for p in parts) and len(parts) > 1:
        raise ValueError("starts with ControlNet requests or precomputed conditioning run alone, not batched")
    join = lambda *xs: None if xs[0] is None else jnp.concatenate(xs)  # noqa: E731
    fields = ("noise", "x_start", "x0", "mask", "extra", "uncond_extra")
    arrays = {f: jax.tree.map(join, *[getattr(p, f) for p in parts], is_leaf=lambda x: x is None) for f in fields}
    return dataclasses.replace(first, **arrays)
