"""One Stable Diffusion pipeline around one jitted sampling loop.

``StableDiffusion.load(path)`` takes a diffusers folder, a single file or a Hub
id. Every mode (txt2img, img2img, inpaint, denoise, upscale, interpolation,
progression) builds a conditioning pytree and a start point, then calls
:meth:`StableDiffusion.latents`, which runs ``sd_jax.sampling.samplers.sample``
inside ``jax.jit`` (one compile per shapes/sampler/steps/mode), with the batch
sharded over the mesh's data axes and the parameters replicated.

Latents are NHWC; images are [0, 1] floats NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.unet import UNet2DConditionModel
from sd_jax.models.vae import AutoencoderKL, DiagonalGaussian
from sd_jax.pipelines.prompts import TextEncoders, sdxl_time_ids
from sd_jax.sampling.denoiser import make_denoiser
from sd_jax.sampling.guidance import cfg_model, stack_conditioning
from sd_jax.sampling.registry import SAMPLERS, init_noise_sigma, sample, sampler_grid
from sd_jax.schedules import NoiseSchedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Options:
    """Static choices: a new combination compiles once, then is reused."""

    sampler: str = "euler"
    steps: int = 20
    schedule: str = "default"  # schedule type of the grid (registry.SCHEDULE_TYPES)
    guidance: bool = True  # False: guidance scale 1, the unconditional pass is skipped
    start: int = 0  # first step (img2img / denoise)
    blend: bool = False  # masked-latent inpainting with an ordinary U-Net
    record: bool = False  # return each step's x0 estimate
    micro_batch: int | None = None


@dataclasses.dataclass
class StableDiffusion:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: TextEncoders
    schedule: NoiseSchedule
    params: dict[str, Any]  # {"unet": ..., "vae": ...}
    source: str = ""
    pipeline_class: str = ""
    max_noise_level: int = 350
    low_res_schedule: NoiseSchedule | None = None
    mesh: Any = None
    safety: Any = None  # (SafetyChecker module, params, preprocess size, crop) when the folder ships one
    safety_enabled: bool = True
    last_nsfw: Any = None  # flags of the last checked batch
    scheduler_config: dict = dataclasses.field(default_factory=dict)  # the folder's scheduler_config.json
    on_step: Any = None  # f(step, total): called from the host once per sampler step while the jitted loop runs

    # -- construction --

    @classmethod
    def load(cls, path, *, dtype="float32", query_chunk_size=None, config_dir=None, allow_pickle=False, mesh=None,
             safety_checker=True):  # fmt: skip
        from sd_jax.loading.diffusers import load_checkpoint

        p = pathlib.Path(str(path))
        if p.is_file():
            from sd_jax.loading.single_file import load_single_file

            ckpt = load_single_file(p, config_dir=config_dir, allow_pickle=allow_pickle)
        else:
            ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
        pipe = cls.from_checkpoint(ckpt, dtype=dtype, query_chunk_size=query_chunk_size, mesh=mesh, source=str(path))
        pipe.safety_enabled = safety_checker
        return pipe

    @classmethod
    def from_checkpoint(cls, ckpt, *, dtype="float32", query_chunk_size=None, mesh=None, source=""):
        from sd_jax.tokenizer import fit_to_encoder, load_tokenizer

        dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
        cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dt), tree)  # noqa: E731
        unet = UNet2DConditionModel(ckpt.config("unet"), dtype=dt, param_dtype=dt, query_chunk_size=query_chunk_size)
        vae_cfg = ckpt.config("vae")
        vae_dt = jnp.float32 if vae_cfg.force_upcast else dt  # as diffusers upcasts fp16 VAEs that overflow
        vae = AutoencoderKL(vae_cfg, dtype=vae_dt, param_dtype=vae_dt)
        from sd_jax.models.clip import CLIPTextModel

        names = [n for n in ("text_encoder", "text_encoder_2") if n in ckpt.models]
        tok_names = ["tokenizer", "tokenizer_2"][: len(names)]
        text = TextEncoders(
            tokenizers=[
                fit_to_encoder(load_tokenizer(ckpt.tokenizer_dir(t)), ckpt.config(n).max_position_embeddings)
                for t, n in zip(tok_names, names)
            ],
            modules=[CLIPTextModel(ckpt.config(n), dtype=dt, param_dtype=dt) for n in names],
            params=[cast(ckpt.params(n)) for n in names],
            sdxl=len(names) == 2,
            force_zeros_for_empty_prompt=bool(ckpt.index.get("force_zeros_for_empty_prompt", False)),
        )
        low_res = None
        low_cfg = ckpt.path / "low_res_scheduler" / "scheduler_config.json"
        if low_cfg.exists():
            import json

            low_res = NoiseSchedule.from_diffusers_config(json.loads(low_cfg.read_text()))
        safety = None
        if "safety_checker" in ckpt.models:
            import json

            from sd_jax.models.safety_checker import SafetyChecker

            sc_cfg = ckpt.config("safety_checker")
            size, crop = sc_cfg.image_size, sc_cfg.image_size
            fe = ckpt.path / "feature_extractor" / "preprocessor_config.json"
            if fe.exists():
                fe_cfg = json.loads(fe.read_text())
                size = fe_cfg.get("size", {}).get("shortest_edge", size)
                crop = fe_cfg.get("crop_size", {}).get("height", crop)
            safety = (SafetyChecker(sc_cfg), ckpt.params("safety_checker"), size, crop)
        params = {
            "unet": cast(ckpt.params("unet")),
            "vae": jax.tree.map(lambda a: jnp.asarray(a, vae_dt), ckpt.params("vae")),
        }
        return cls(
            unet=unet,
            vae=vae,
            text=text,
            schedule=NoiseSchedule.from_diffusers_config(ckpt.scheduler_config),
            scheduler_config=dict(ckpt.scheduler_config),
            params=params,
            source=source,
            pipeline_class=ckpt.pipeline_class,
            max_noise_level=int(ckpt.index.get("max_noise_level", 350)),
            low_res_schedule=low_res,
            mesh=mesh,
            safety=safety,
        )

    # -- LoRA --

    def load_lora(self, path, scale: float = 1.0):
        """Merge a LoRA file (diffusers/peft or kohya names) into the weights: W + scale * alpha/rank * B@A.

        Returns the loaded :class:`~sd_jax.models.lora.Lora`; :meth:`unmerge_lora` takes it back out.
        """
        from sd_jax.loading.lora import load_lora

        lora = load_lora(path, self._lora_params(), unet_config=self.unet.config)
        self._set_lora_params(lora, scale)
        return lora

    def unmerge_lora(self, lora, scale: float = 1.0) -> None:
        self._set_lora_params(lora, -scale)

    def _lora_params(self) -> dict:
        names = ("text_encoder", "text_encoder_2")[: len(self.text.params)]
        return {"unet": self.params["unet"], **dict(zip(names, self.text.params))}

    def _set_lora_params(self, lora, scale):
        from sd_jax.models.lora import merge_lora

        merged = merge_lora(self._lora_params(), lora, scale)
        self.params["unet"] = merged["unet"]
        for i, name in enumerate(("text_encoder", "text_encoder_2")[: len(self.text.params)]):
            self.text.params[i] = merged[name]

    # -- properties --

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def is_inpaint_unet(self) -> bool:
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def is_upscaler(self) -> bool:
        return self.unet.config.num_class_embeds is not None

    @property
    def is_sdxl(self) -> bool:
        return self.text.sdxl

    @property
    def default_sampler(self) -> str:
        """The sampler of the folder's own scheduler (``scheduler_config.json`` ``_class_name``), as diffusers uses."""
        cls_name = self.scheduler_config.get("_class_name", "")
        if cls_name == "DPMSolverMultistepScheduler":
            return "dpmpp_2m_sde" if "sde" in self.scheduler_config.get("algorithm_type", "") else "dpmpp_2m"
        names = [n for n, spec in SAMPLERS.items() if spec.diffusers_class == cls_name]
        return names[0] if names else "euler"

    def _sampler(self, sampler: str | None) -> str:
        return self.default_sampler if sampler is None else sampler

    @staticmethod
    def check_request(steps: int, guidance_scale: float = 7.5) -> None:
        """Numbers every mode takes: a positive integer step count and a finite guidance scale."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")

    @staticmethod
    def as_image(image, what: str = "image"):
        """A float image batch in [0, 1] (NHWC or HWC); 0..255 arrays and other ranges are refused."""
        a = np.asarray(image, np.float32)
        if a.ndim not in (3, 4):
            raise ValueError(f"{what} has shape {a.shape}; pass [H, W, C] or [N, H, W, C] floats in [0, 1]")
        lo, hi = float(a.min()), float(a.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{what} values span [{lo:g}, {hi:g}]; pass floats in [0, 1] (divide 8-bit images by 255)")
        return jnp.asarray(a)

    def check_size(self, height: int, width: int) -> None:
        f = self.vae_scale_factor
        if height % 8 or width % 8 or height % f or width % f:
            raise ValueError(
                f"height and width must be multiples of 8 (and of the VAE factor {f}); got {height}x{width}"
            )

    # -- conditioning --

    def conditioning(self, prompts: Sequence[str], negative: Sequence[str] | None, guidance_scale: float,
                     height: int, width: int, clip_skip: int | None = None):  # fmt: skip
        """(cond, uncond or None) pytrees with a leading batch axis."""
        n = len(prompts)
        cond = self.text.encode(prompts, clip_skip)
        uncond = self.text.encode_negative(negative, n, clip_skip) if guidance_scale > 1 else None
        if self.is_sdxl:  # micro-conditioning: original size, crop top-left, target size
            ids = sdxl_time_ids(np.full((n, 2), (height, width)), (0, 0), (height, width))
            cond["time_ids"] = ids
            if uncond is not None:
                uncond["time_ids"] = ids
        return cond, uncond

    # -- the one loop --

    def _model(self, unet_params):
        unet = self.unet

        def model(x, t, c):
            inp = x if "concat" not in c else jnp.concatenate([x, c["concat"].astype(x.dtype)], axis=-1)
            t = jnp.broadcast_to(t, (x.shape[0],))
            return unet.apply(
                {"params": unet_params},
                inp.astype(unet.dtype),
                t,
                c["context"],
                text_embeds=c.get("text_embeds"),
                time_ids=c.get("time_ids"),
                class_labels=c.get("class_labels"),
            )

        return model

    @functools.cached_property
    def _compiled(self) -> dict:
        return {}

    def _grid(self, sampler: str, steps: int, schedule: str = "default"):
        """The grid ``sampler`` walks for ``steps`` steps under schedule type ``schedule``."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(sorted(SAMPLERS))}")
        if schedule == "karras" and sampler == "dpmpp_2m":
            sampler = "dpmpp_2m_karras"
        elif schedule != "default":
            raise ValueError(f"schedule type {schedule!r} is not available for sampler {sampler!r}")
        return sampler_grid(sampler, self.schedule, steps)

    def _report(self, i, start: int, steps: int) -> None:
        if self.on_step is not None:
            self.on_step(int(i) - start + 1, steps - start)

    def _loop(self, opts: Options):
        grid = self._grid(opts.sampler, opts.steps, opts.schedule)
        sigmas, ts = grid.sigmas, grid.ts
        init = init_noise_sigma(opts.sampler, self.schedule, grid)
        extra = {k: jnp.asarray(v) for k, v in grid.extra.items()}
        schedule = self.schedule

        def one(unet_params, noise, cond, uncond, scale, rescale, key, x_start, x0, mask):
            model = self._model(unet_params)
            if opts.guidance:
                model = cfg_model(model, scale, rescale)
                c = stack_conditioning(uncond, cond)
            else:
                c = cond
            denoise = make_denoiser(model, schedule, c)
            sig, tt = jnp.asarray(sigmas), jnp.asarray(ts)
            last = sig.shape[0] - 2

            def hook(i, x, d):
                # Progress goes to the host without ordering, so the loop never waits on it; on_step is read
                # when it fires, so setting it needs no recompile.
                jax.debug.callback(functools.partial(self._report, start=opts.start, steps=opts.steps), i)
                if not opts.blend:
                    return x
                # keep the known region on the forward process (diffusers' 4-channel inpainting)
                target = jnp.where(i == last, x0 * jnp.sqrt(sig[-1] ** 2 + 1), x0 + sig[i + 1] * noise)
                return (1 - mask) * target + mask * x

            return sample(
                opts.sampler, denoise, noise, sig, tt, key, init_sigma=init, hook=hook,
                record=opts.record, start=opts.start, x_start=x_start, **extra,
            )  # fmt: skip

        def run(unet_params, noise, cond, uncond, scale, rescale, key, x_start, x0, mask):
            b = noise.shape[0]
            m = opts.micro_batch
            if not m or m >= b:
                return one(unet_params, noise, cond, uncond, scale, rescale, key, x_start, x0, mask)
            if b % m:
                raise ValueError(f"batch {b} is not a multiple of micro_batch {m}")
            split = lambda t: jax.tree.map(lambda a: a.reshape(b // m, m, *a.shape[1:]), t)  # noqa: E731
            keys = jax.random.split(key, b // m)
            xs = split((noise, cond, uncond, x_start, x0, mask))
            out, ds = jax.lax.map(lambda a: one(unet_params, a[0][0], a[0][1], a[0][2], scale, rescale, a[1],
                                                a[0][3], a[0][4], a[0][5]), (xs, keys))  # fmt: skip
            out = out.reshape(b, *out.shape[2:])
            if ds is not None:  # [chunks, steps, m, ...] -> [steps, b, ...]
                ds = jnp.moveaxis(ds, 1, 0).reshape(ds.shape[1], b, *ds.shape[3:])
            return out, ds

        return jax.jit(run)

    def latents(self, noise, cond, uncond=None, *, guidance_scale=7.5, guidance_rescale=0.0, key=None,
                opts: Options = Options(), x_start=None, x0=None, mask=None):  # fmt: skip
        """Run the sampler; returns (final latents, per-step x0 estimates or None)."""
        opts = dataclasses.replace(opts, guidance=uncond is not None and guidance_scale != 1.0, blend=mask is not None)
        fn = self._compiled.get(opts)
        if fn is None:
            fn = self._compiled[opts] = self._loop(opts)
        key = jax.random.key(0) if key is None else key
        args = (noise, cond, uncond, x_start, x0, mask)
        b = noise.shape[0]
        if self.mesh is not None:
            from sd_jax.sharding import batch_sharding

            shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            pad = -b % shards  # pad the batch to a multiple of the devices, repeating the last entry
            if pad:
                args = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), args)
            args = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(self.mesh, a.ndim)), args)
        noise, cond, uncond, x_start, x0, mask = args
        lat, ds = fn(self.params["unet"], noise, cond, uncond, jnp.float32(guidance_scale),
                     jnp.float32(guidance_rescale), key, x_start, x0, mask)  # fmt: skip
        return lat[:b], (None if ds is None else ds[:, :b])

    # -- VAE --

    def _tiling(self, tiled: bool | None, size: int, tile: int) -> bool:
        """None: tile beyond twice the VAE's native tile; True: diffusers' ``enable_tiling()`` (tile when larger
        than one tile); False: never."""
        return size > (2 * tile if tiled is None else tile) if tiled is not False else False

    def encode(self, images, key=None, tiled: bool | None = None):
        """[0, 1] NHWC images -> scaled latents (posterior sample with ``key``, else its mean)."""
        from sd_jax.models import vae as vae_lib

        x = jnp.asarray(images, jnp.float32) * 2 - 1
        if self._tiling(tiled, max(x.shape[1], x.shape[2]), self.vae.config.sample_size):
            mean, logvar = vae_lib.tiled_encode(self.vae, self.params["vae"], x)
        else:
            mean, logvar = _vae_encode(self.vae, self.params["vae"], x)
        post = DiagonalGaussian(mean, logvar)
        z = post.mode() if key is None else post.sample(key)
        cfg = self.vae.config
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def check_safety(self, images: np.ndarray) -> np.ndarray:
        """diffusers' safety checker, when the checkpoint ships one: flagged images become black."""
        if self.safety is None or not self.safety_enabled:
            self.last_nsfw = None
            return images
        from sd_jax.models.safety_checker import flag_images, preprocess

        module, params, size, crop = self.safety
        cos_c, cos_s = jax.jit(module.apply)({"params": params}, jnp.asarray(preprocess(images, size, crop)))
        self.last_nsfw = flag_images(cos_c, cos_s, params)
        if self.last_nsfw.any():
            import warnings

            warnings.warn(
                f"{int(self.last_nsfw.sum())} image(s) flagged by the safety checker were replaced by black; "
                "pass safety_checker=False (CLI: --no-safety-checker) to turn it off",
                stacklevel=2,
            )
        return np.where(self.last_nsfw[:, None, None, None], 0.0, images).astype(np.float32)

    def decode(self, latents, tiled: bool | None = None, safe: bool = True) -> np.ndarray:
        """Scaled latents -> [0, 1] images.

        ``tiled=None``: latents more than twice the VAE's native tile (``sample_size / factor``, 64 for
        SD 1.5) on a side decode tile by tile, so memory stays bounded; below that the
        plain decode matches diffusers exactly (tiling blends seams, so it differs slightly).
        ``tiled=True`` is diffusers' ``vae.enable_tiling()``; ``False`` never tiles.
        """
        from sd_jax.models import vae as vae_lib

        cfg = self.vae.config
        z = jnp.asarray(latents, jnp.float32) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        tile = cfg.sample_size // cfg.downsample_factor
        x = (
            vae_lib.tiled_decode(self.vae, self.params["vae"], z)
            if self._tiling(tiled, max(z.shape[1], z.shape[2]), tile)
            else _vae_decode(self.vae, self.params["vae"], z)
        )
        images = np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0, 1)
        return self.check_safety(images) if safe else images

    # -- modes --

    def _noise(self, key, n, height, width):
        f = self.vae_scale_factor
        return jax.random.normal(key, (n, height // f, width // f, self.latent_channels), jnp.float32)

    def txt2img(self, prompts, *, negative=None, height=None, width=None, steps=20, sampler=None,
                schedule="default", guidance_scale=7.5, guidance_rescale=0.0, seed=0, noise=None, record=False,
                micro_batch=None, clip_skip=None, tiled=None):  # fmt: skip
        """Text to images: returns (images [N, H, W, 3] in [0, 1], per-step x0 latents or None).

        Common options of every mode: ``sampler`` (None: the folder's own scheduler, :attr:`default_sampler`),
        ``schedule`` (the grid's schedule type), ``tiled`` (VAE tiling, see :meth:`decode`) and, for txt2img,
        img2img and inpaint, ``guidance_rescale`` and ``clip_skip``. ``clip_skip`` applies to the prompt and the
        negative prompt alike, as A1111 does (diffusers applies it to the prompt only).
        """
        self.check_request(steps, guidance_scale)
        sampler = self._sampler(sampler)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_size(height, width)
        key = jax.random.key(seed)
        noise = self._noise(jax.random.fold_in(key, 1), len(prompts), height, width) if noise is None else noise
        negative = [negative] * len(prompts) if isinstance(negative, str) else negative
        cond, uncond = self.conditioning(prompts, negative, guidance_scale, height, width, clip_skip)
        opts = Options(sampler=sampler, steps=steps, schedule=schedule, record=record, micro_batch=micro_batch)
        lat, ds = self.latents(noise, cond, uncond, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                               key=jax.random.fold_in(key, 2), opts=opts)  # fmt: skip
        return self.decode(lat, tiled=tiled), ds

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


@functools.partial(jax.jit, static_argnums=0)
def _vae_encode(vae, params, x):
    return vae.apply({"params": params}, x, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=0)
def _vae_decode(vae, params, z):
    return vae.apply({"params": params}, z, method=AutoencoderKL.decode)


def _nearest(mask, h, w):
    """``F.interpolate(mask, size=(h, w))`` (nearest) in NHWC."""
    from sd_jax.models.unet_blocks import upsample_nearest

    return upsample_nearest(mask, (h, w))
