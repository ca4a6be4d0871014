"""One Stable Diffusion pipeline around one jitted sampling loop.

``StableDiffusion.load(path)`` takes a diffusers folder, a single file or a Hub
id. Every mode (txt2img, img2img, inpaint, denoise, upscale, interpolation,
progression) builds a conditioning pytree and a start point, then calls
:meth:`StableDiffusion.latents`, which runs :func:`sd_jax.pipelines.loop.build_loop`'s
loop inside ``jax.jit`` (one compile per shapes/sampler/steps/mode), with the batch
sharded over the mesh's data axes and the parameters replicated. The modes other than
txt2img live in :mod:`sd_jax.pipelines.modes`.

The sampler defaults to the folder's own scheduler, with every option of its
``scheduler_config.json`` read as diffusers reads it (:mod:`sd_jax.sampling.scheduler_config`).

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
from sd_jax.pipelines.loop import Options, build_loop
from sd_jax.pipelines.modes import ImageModes
from sd_jax.pipelines.prompts import TextEncoders, sdxl_time_ids
from sd_jax.sampling.registry import Grid, sampler_grid
from sd_jax.sampling.scheduler_config import Resolved, SchedulerConfig
from sd_jax.schedules import NoiseSchedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}
__all__ = ["DTYPES", "Options", "StableDiffusion"]


@dataclasses.dataclass
class StableDiffusion(ImageModes):
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
    scheduler: SchedulerConfig | None = None  # read from scheduler_config (or schedule) when not given

    def __post_init__(self):
        if self.scheduler is None:
            raw = self.scheduler_config or {
                "_class_name": "EulerDiscreteScheduler",
                **dataclasses.asdict(self.schedule),
            }
            self.scheduler = SchedulerConfig.from_dict(raw, self.pipeline_class, source=_scheduler_source(self.source))

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
        raw = dict(ckpt.scheduler_config)
        listed = ckpt.index.get("scheduler")  # diffusers builds the class model_index.json names
        if isinstance(listed, (list, tuple)) and len(listed) == 2 and listed[1]:
            raw["_class_name"] = listed[1]
        scheduler = SchedulerConfig.from_dict(raw, ckpt.pipeline_class, source=_scheduler_source(source))
        return cls(
            unet=unet,
            vae=vae,
            text=text,
            schedule=scheduler.default_schedule(),
            scheduler_config=raw,
            scheduler=scheduler,
            params=params,
            source=source,
            pipeline_class=ckpt.pipeline_class,
            max_noise_level=int(ckpt.index.get("max_noise_level", 350)),
            low_res_schedule=low_res,
            mesh=mesh,
            safety=safety,
        )

    @classmethod
    def from_components(cls, comps, params: dict, *, mesh=None, source: str = "", **kw) -> StableDiffusion:
        """The pipeline around a :class:`~sd_jax.components.Components` and its ``params`` dict (in-memory weights,
        e.g. the trainer's): sampling during training uses the very modules it trains."""
        text = TextEncoders(
            tokenizers=list(comps.tokenizers),
            modules=list(comps.text_encoders),
            params=[params[n] for n in comps.text_names],
            sdxl=comps.sdxl,
            force_zeros_for_empty_prompt=comps.force_zeros_for_empty_prompt,
        )
        scheduler = SchedulerConfig.from_dict(comps.scheduler_config, comps.pipeline_class,
                                              source=_scheduler_source(source))  # fmt: skip
        return cls(unet=comps.unet, vae=comps.vae, text=text, schedule=scheduler.default_schedule(),
                   scheduler_config=dict(comps.scheduler_config), scheduler=scheduler,
                   params={"unet": params["unet"], "vae": params["vae"]}, source=source,
                   pipeline_class=comps.pipeline_class, mesh=mesh, **kw)  # fmt: skip

    def set_params(self, params: dict) -> None:
        """Swap in new weights of the same shapes (``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}``);
        nothing recompiles."""
        self.params = {"unet": params["unet"], "vae": params["vae"]}
        self.text.params = [params[n] for n in ("text_encoder", "text_encoder_2")[: len(self.text.params)]]

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
        """The sampler of the folder's own scheduler (``scheduler_config.json`` ``_class_name`` and, for
        DPMSolverMultistep, ``algorithm_type``), as diffusers uses it."""
        return self.scheduler.default_sampler

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

    def plan(self, sampler: str | None, steps: int, schedule: str = "default") -> tuple[Resolved, Grid]:
        """The resolved sampler (None: the folder's own) and the grid it walks for ``steps`` steps under schedule
        type ``schedule``, from the folder's scheduler config. Cheap; raises before any sampling."""
        key = (sampler, steps, schedule)
        if key not in self._plans:
            resolved = self.scheduler.resolve(sampler, schedule)
            grid = sampler_grid(resolved.sampler, resolved.schedule, steps, resolved.options)
            self._plans[key] = (resolved, grid)
        return self._plans[key]

    @functools.cached_property
    def _plans(self) -> dict:
        return {}

    def _grid(self, sampler: str | None, steps: int, schedule: str = "default") -> Grid:
        return self.plan(sampler, steps, schedule)[1]

    def _report(self, i, start: int, steps: int) -> None:
        if self.on_step is not None:
            self.on_step(int(i) - start + 1, steps - start)

    def _loop(self, opts: Options):
        report = functools.partial(self._report, start=opts.start, steps=opts.steps)
        return build_loop(self._model, self.plan(opts.sampler, opts.steps, opts.schedule), opts, report)

    def latents(self, noise, cond, uncond=None, *, guidance_scale=7.5, guidance_rescale=0.0, key=None,
                opts: Options | None = None, x_start=None, x0=None, mask=None):  # fmt: skip
        """Run the sampler; returns (final latents, per-step x0 estimates or None)."""
        opts = dataclasses.replace(
            Options() if opts is None else opts,
            guidance=uncond is not None and guidance_scale != 1.0,
            blend=mask is not None,
        )
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


@functools.partial(jax.jit, static_argnums=0)
def _vae_encode(vae, params, x):
    return vae.apply({"params": params}, x, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=0)
def _vae_decode(vae, params, z):
    return vae.apply({"params": params}, z, method=AutoencoderKL.decode)


def _scheduler_source(source: str) -> str:
    return f"{source}/scheduler/scheduler_config.json" if source else "scheduler_config.json"
