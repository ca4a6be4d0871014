"""One Stable Diffusion pipeline: one generate path around one jitted sampling loop.

``StableDiffusion.load(path)`` takes a diffusers folder, a single file or a Hub id (:mod:`sd_jax.pipelines.load`).
The pipeline holds a :class:`~sd_jax.components.Components`, its parameters (one dict keyed by component name),
the folder's scheduler config, the mesh and the safety checker. Every mode (:mod:`sd_jax.pipelines.modes`) builds
a :class:`~sd_jax.pipelines.starts.Start` and calls :meth:`StableDiffusion.generate`, which conditions
(:mod:`sd_jax.pipelines.conditioning`), samples with :func:`sd_jax.pipelines.loop.build_loop`'s loop inside
``jax.jit`` (one compile per shapes/sampler/steps/mode, the batch sharded over the mesh's data axes), decodes and
runs the safety checker.

The sampler defaults to the folder's own scheduler, with every option of its ``scheduler_config.json`` read as
diffusers reads it (:mod:`sd_jax.sampling.scheduler_config`). Latents are NHWC; images are [0, 1] floats NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import components as C
from sd_jax.pipelines import conditioning, load
from sd_jax.pipelines import controlnet as control
from sd_jax.pipelines.loop import Options, build_loop
from sd_jax.pipelines.modes import ImageModes
from sd_jax.pipelines.starts import Start
from sd_jax.sampling.registry import Grid, sampler_grid
from sd_jax.sampling.scheduler_config import Resolved, SchedulerConfig

DTYPES = C.DTYPES
__all__ = ["DTYPES", "Options", "Start", "StableDiffusion"]


class StableDiffusion(ImageModes, control.ControlNets):
    def __init__(self, components: C.Components | None = None, params: dict | None = None, *,
                 scheduler: SchedulerConfig | None = None, source: str = "", mesh=None, safety=None,
                 safety_enabled: bool = True, max_noise_level: int = 350, low_res_schedule=None, on_step=None,
                 **legacy):  # fmt: skip
        if legacy or components is None:  # the old field-by-field constructor (unet=, vae=, text=, schedule=)
            from sd_jax.pipelines.prompts import legacy_components

            components, params = legacy_components(params, **legacy)
        self.components = components
        self.params = dict(params)  # {"unet", "vae", "text_encoder"[, "text_encoder_2"]}
        self.source = source
        self.scheduler = scheduler or SchedulerConfig.from_dict(
            components.scheduler_config, components.pipeline_class, source=load.scheduler_source(source)
        )
        self.mesh = mesh
        self.sharding = "dp"  # how the weights lie on the mesh (:meth:`shard`)
        self.safety = safety  # (SafetyChecker module, params, preprocess size, crop) when the folder ships one
        self.safety_enabled = safety_enabled
        self.last_nsfw = None  # flags of the last checked batch
        self.max_noise_level = max_noise_level
        self.low_res_schedule = low_res_schedule
        self.on_step = on_step  # f(step, total): called from the host once per sampler step while the loop runs
        # f() -> bool, asked from the host before each step; True skips the remaining steps (an interrupt). Set, it
        # compiles loops that wait on the host each step (the server); None (the default) never asks.
        self.should_stop = None
        self.output_latents = False  # True: generate returns the final latents undecoded (hires fix's first pass)
        self.ip_adapter = None  # IP-Adapter image encoder and adapters (sd_jax.pipelines.ip_adapter), when loaded
        self.emphasis = "a1111"  # prompt weighting: "a1111", "comfy" or "none" (sd_jax.pipelines.long_prompts)
        self.max_prompt_chunks = 8  # longest prompt, in 75-token chunks (A1111 has no cap)
        self._compiled: dict = {}  # Options -> jitted loop
        self._plans: dict = {}

    # -- construction --

    @classmethod
    def load(cls, path, *, dtype="float32", query_chunk_size=None, config_dir=None, allow_pickle=False, mesh=None,
             safety_checker=True, controlnet=None, attention="auto", conv="auto", sharding="dp"):  # fmt: skip
        """``controlnet``: a ControlNet path or Hub id, or a list of them (:meth:`load_controlnet`). ``attention``:
        the attention kernel (:mod:`sd_jax.models.attention_kernels`), ``conv`` the convolution algorithm
        (:mod:`sd_jax.models.conv_kernels`); ``sharding``: how the weights lie on ``mesh`` (:meth:`shard`)."""
        ckpt = load.read_checkpoint(path, config_dir=config_dir, allow_pickle=allow_pickle)
        pipe = cls.from_checkpoint(ckpt, dtype=dtype, query_chunk_size=query_chunk_size, mesh=mesh, source=str(path),
                                   attention=attention, conv=conv, release=True)  # fmt: skip
        pipe.safety_enabled = safety_checker
        if controlnet is not None:
            pipe.load_controlnet(controlnet, allow_pickle=allow_pickle)
        if mesh is not None and sharding != "dp":
            pipe.shard(sharding)
        return pipe

    @classmethod
    def from_checkpoint(cls, ckpt, *, dtype="float32", query_chunk_size=None, mesh=None, source="", attention="auto",
                        conv="auto", release=False):  # fmt: skip
        comps, params = C.from_checkpoint(ckpt, dtype=dtype, query_chunk_size=query_chunk_size, attention=attention,
                                          conv=conv, release=release)  # fmt: skip
        return cls.from_components(comps, params, mesh=mesh, source=source, **load.sampling_parts(ckpt))

    @classmethod
    def from_components(cls, comps, params: dict, *, mesh=None, source: str = "", **kw) -> StableDiffusion:
        """The pipeline around a :class:`~sd_jax.components.Components` and its ``params`` dict (in-memory weights,
        e.g. the trainer's): sampling during training uses the very modules it trains."""
        return cls(comps, {n: params[n] for n in ("unet", "vae", *comps.text_names)}, mesh=mesh, source=source, **kw)

    def set_params(self, params: dict) -> None:
        """Swap in new weights of the same shapes (``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}``, and
        ``"controlnet"``, one params dict per loaded net, or the ones loaded stay); nothing recompiles."""
        new = {n: params[n] for n in ("unet", "vae", *self.components.text_names)}
        if self.controlnets:
            nets = params.get("controlnet", self.params["controlnet"])
            new["controlnet"] = (nets,) if isinstance(nets, dict) else tuple(nets)
        self.params = new

    def shard(self, strategy: str = "fsdp") -> None:
        """Lay the weights out on the mesh by the training rules (:mod:`sd_jax.placement`): ``dp`` replicates
        them, ``fsdp`` / ``fsdp_tp`` split them over the ``fsdp`` (and ``tensor``) axes, for a model larger than
        one device. The same jitted loop then runs on the sharded weights; the batch stays split over the data
        axes."""
        from sd_jax import placement

        if self.mesh is None:
            raise ValueError(f"sharding {strategy!r} needs a mesh: StableDiffusion.load(..., mesh=make_mesh(...))")
        names = ("unet", "vae", *self.components.text_names)
        shardings = placement.param_shardings(self.components, names, self.mesh, strategy)
        new = {**self.params, **{n: placement.place(self.params[n], shardings[n]) for n in names}}
        if self.controlnets:
            new["controlnet"] = tuple(placement.place(p, placement.controlnet_shardings(m, self.mesh, strategy))
                                      for m, p in zip(self.controlnets, self.params["controlnet"]))  # fmt: skip
        self.params = new
        self.sharding = strategy

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

    def load_ip_adapter(self, path, image_encoder=None, **kw):
        """diffusers' ``load_ip_adapter``: see :func:`sd_jax.pipelines.ip_adapter.load_ip_adapter`."""
        from sd_jax.pipelines import ip_adapter

        return ip_adapter.load_ip_adapter(self, path, image_encoder, **kw)

    def set_ip_adapter_scale(self, scale) -> None:
        from sd_jax.pipelines import ip_adapter

        ip_adapter.set_ip_adapter_scale(self, scale)

    def unload_ip_adapter(self) -> None:
        from sd_jax.pipelines import ip_adapter

        ip_adapter.unload_ip_adapter(self)

    def load_textual_inversion(self, path, token=None, *, allow_pickle: bool = False):
        """diffusers' ``load_textual_inversion`` (``path`` may be ``PATH[:token]``): see
        :func:`sd_jax.loading.embeddings.load_textual_inversion`."""
        from sd_jax.loading.embeddings import load_textual_inversion

        return load_textual_inversion(self, path, token, allow_pickle=allow_pickle)

    def _lora_params(self) -> dict:
        return {n: self.params[n] for n in ("unet", *self.components.text_names)}

    def _set_lora_params(self, lora, scale):
        from sd_jax.models.lora import merge_lora

        self.params.update(merge_lora(self._lora_params(), lora, scale))

    # -- properties --

    @property
    def unet(self):
        return self.components.unet

    @property
    def vae(self):
        return self.components.vae

    @property
    def text(self):
        """Deprecated: the text encoders are ``components.text_encoders`` and their weights ``params``."""
        import warnings

        from sd_jax.pipelines.prompts import TextView

        warnings.warn("pipe.text is deprecated: use pipe.components (text_encoders, tokenizers) and "
                      'pipe.params["text_encoder"]', DeprecationWarning, 2)  # fmt: skip
        return TextView(self)

    @property
    def schedule(self):
        """The trained noise schedule as the folder's scheduler reads it."""
        return self.scheduler.default_schedule()

    @property
    def scheduler_config(self) -> dict:
        return self.components.scheduler_config

    @property
    def pipeline_class(self) -> str:
        return self.components.pipeline_class

    @property
    def vae_scale_factor(self) -> int:
        return self.components.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.components.latent_channels

    @property
    def is_inpaint_unet(self) -> bool:
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def is_upscaler(self) -> bool:
        return self.unet.config.num_class_embeds is not None

    @property
    def is_sdxl(self) -> bool:
        return self.components.sdxl

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

    def conditioning(self, prompts: Sequence[str], negative: Sequence[str] | None, guidance_scale: float,
                     height: int, width: int, clip_skip: int | None = None):  # fmt: skip
        """(cond, uncond or None) pytrees with a leading batch axis (:func:`conditioning.text_conditioning`)."""
        return conditioning.text_conditioning(self.components, self.params, prompts, negative, guidance_scale,
                                              height, width, clip_skip, emphasis=self.emphasis,
                                              max_chunks=self.max_prompt_chunks)  # fmt: skip

    # -- the one generate path --

    def generate(self, start: Start, prompts, negative=None, *, steps: int = 20, sampler: str | None = None,
                 schedule: str = "default", guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None, key=None, record: bool = False, micro_batch: int | None = None,
                 tiled: bool | None = None, safe: bool = True, ip_adapter_image=None,
                 ip_adapter_image_embeds=None):  # fmt: skip
        """Prompts and a mode's ``start`` -> ``(images, per-step x0 latents or None)``: normalise the prompts,
        condition (plus the start's extra conditioning and an IP-Adapter image prompt), sample from the start's
        step (nothing when that is ``steps``), decode, safety check. ``key`` drives stochastic samplers."""
        if start.step >= steps:  # strength 0: the start is the result
            return self._output(start.x_start, tiled, safe), None
        prompts = conditioning.prompt_list(prompts)
        if start.cond is not None:
            cond, uncond = start.cond
        else:
            negative = conditioning.negative_list(negative, len(prompts))
            cond, uncond = self.conditioning(prompts, negative, guidance_scale, *start.size, clip_skip)
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            from sd_jax.pipelines import ip_adapter

            cip, uip = ip_adapter.image_conditioning(self, ip_adapter_image, len(prompts), ip_adapter_image_embeds)
            cond, uncond = {**cond, "ip": cip}, None if uncond is None else {**uncond, "ip": uip}
        if start.extra:
            cond = {**cond, **start.extra}
            uncond = None if uncond is None else {**uncond, **start.extra, **start.uncond_extra}
        if start.control is not None:
            ctl = control.control_conditioning(self, start.control, start.noise.shape[0], *start.size, steps,
                                                  start.step)  # fmt: skip
            cond, uncond = control.attach(ctl, cond, uncond)
        opts = Options(sampler=self._sampler(sampler), steps=steps, schedule=schedule, start=start.step,
                       end=start.end, record=record, micro_batch=micro_batch,
                       controlnets=tuple(n.config for n in self.controlnets) if start.control else ())  # fmt: skip
        lat, ds = self.latents(start.noise, cond, uncond, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, key=key, opts=opts, x_start=start.x_start,
                               x0=start.x0, mask=start.mask)  # fmt: skip
        return self._output(lat, tiled, safe), ds

    def _output(self, latents, tiled, safe):
        return latents if self.output_latents else self.decode(latents, tiled=tiled, safe=safe)

    def hires_fix(self, prompts, **kw):
        """A1111's hires fix: txt2img, upscale, img2img larger (:func:`sd_jax.pipelines.hires.hires_fix`)."""
        from sd_jax.pipelines.hires import hires_fix

        return hires_fix(self, prompts, **kw)

    def plan(self, sampler: str | None, steps: int, schedule: str = "default") -> tuple[Resolved, Grid]:
        """The resolved sampler (None: the folder's own) and the grid it walks for ``steps`` steps under schedule
        type ``schedule``, from the folder's scheduler config. Cheap; raises before any sampling."""
        key = (sampler, steps, schedule)
        if key not in self._plans:
            resolved = self.scheduler.resolve(sampler, schedule)
            grid = sampler_grid(resolved.sampler, resolved.schedule, steps, resolved.options)
            self._plans[key] = (resolved, grid)
        return self._plans[key]

    def _grid(self, sampler: str | None, steps: int, schedule: str = "default") -> Grid:
        return self.plan(self._sampler(sampler), steps, schedule)[1]

    def _model(self, params):
        """``params`` (``{"unet"[, "controlnet"]}``) -> ``model(x, t, cond)``: the U-Net on the latents (plus an
        inpainting/upscaling U-Net's ``concat`` channels), with the extra U-Net arguments ``cond`` asks for."""
        unet, nets = self.unet, self.controlnets

        def model(x, t, c):
            inp = x if "concat" not in c else jnp.concatenate([x, c["concat"].astype(x.dtype)], axis=-1)
            t = jnp.broadcast_to(t, (x.shape[0],))
            extra = {k: c.get(k) for k in ("text_embeds", "time_ids", "class_labels", "timestep_cond")}
            extra["ip_hidden_states"] = c.get("ip")  # IP-Adapter image tokens, when an image prompt is given
            if "control" in c:  # ControlNet residuals, from the latents without the concat channels
                extra.update(control.unet_residuals(nets, params["controlnet"], x.astype(unet.dtype), t, c))
            return unet.apply({"params": params["unet"]}, inp.astype(unet.dtype), t, c["context"], **extra)

        return model

    def _report(self, i, start: int, steps: int) -> None:
        if self.on_step is not None:
            self.on_step(int(i) - start + 1, steps - start)

    def latents(self, noise, cond, uncond=None, *, guidance_scale=7.5, guidance_rescale=0.0, key=None,
                opts: Options | None = None, x_start=None, x0=None, mask=None):  # fmt: skip
        """Run the jitted loop; returns (final latents, per-step x0 estimates or None)."""
        guided = uncond is not None and guidance_scale != 1.0
        opts = dataclasses.replace(Options() if opts is None else opts, guidance=guided, blend=mask is not None,
                                   interruptible=self.should_stop is not None)  # fmt: skip
        fn = self._compiled.get(opts)
        if fn is None:
            report = lambda i: self._report(i, opts.start, opts.steps)  # noqa: E731
            stop = lambda: self.should_stop is not None and bool(self.should_stop())  # noqa: E731
            fn = self._compiled[opts] = build_loop(self._model, self.plan(opts.sampler, opts.steps, opts.schedule),
                                                   opts, report, stop)  # fmt: skip
        key = jax.random.key(0) if key is None else key
        per_row = jnp.ndim(key) == 1  # one key per row (A1111's per-image RNG): padded and sharded with the batch
        args = (noise, cond, uncond, x_start, x0, mask, key if per_row else None)
        b = noise.shape[0]
        if self.mesh is not None:
            from sd_jax.sharding import batch_sharding

            shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            pad = -b % shards  # pad the batch to a multiple of the devices, repeating the last entry
            if pad:
                args = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), args)
            args = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(self.mesh, a.ndim)), args)
        noise, cond, uncond, x_start, x0, mask, row_keys = args
        key = row_keys if per_row else key
        model_params = {"unet": self.params["unet"]}
        if opts.controlnets:
            model_params["controlnet"] = self.params["controlnet"]
        lat, ds = fn(model_params, noise, cond, uncond, jnp.float32(guidance_scale),
                     jnp.float32(guidance_rescale), key, x_start, x0, mask)  # fmt: skip
        return lat[:b], (None if ds is None else ds[:, :b])

    # -- VAE and safety --

    def _tiling(self, tiled: bool | None, size: int, tile: int) -> bool:
        """None: tile beyond twice the VAE's native tile; True: diffusers' ``enable_tiling()`` (tile when larger
        than one tile); False: never."""
        return size > (2 * tile if tiled is None else tile) if tiled is not False else False

    def encode(self, images, key=None, tiled: bool | None = None):
        """[0, 1] NHWC images -> scaled latents (posterior sample with ``key``, else its mean)."""
        x = jnp.asarray(images, jnp.float32) * 2 - 1
        tile = self._tiling(tiled, max(x.shape[1], x.shape[2]), self.vae.config.sample_size)
        return _encode(self.components, self.params["vae"], x, key, tile)

    def decode(self, latents, tiled: bool | None = None, safe: bool = True) -> np.ndarray:
        """Scaled latents -> [0, 1] images.

        ``tiled=None``: latents more than twice the VAE's native tile (``sample_size / factor``, 64 for
        SD 1.5) on a side decode tile by tile, so memory stays bounded; below that the
        plain decode matches diffusers exactly (tiling blends seams, so it differs slightly).
        ``tiled=True`` is diffusers' ``vae.enable_tiling()``; ``False`` never tiles.
        """
        cfg = self.vae.config
        z = jnp.asarray(latents, jnp.float32)
        tile = self._tiling(tiled, max(z.shape[1], z.shape[2]), cfg.sample_size // cfg.downsample_factor)
        x = C.decode_latents(self.components, self.params, z, tiled=True) if tile else _decode(
            self.components, self.params["vae"], z)  # fmt: skip
        images = np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0, 1)
        return self.check_safety(images) if safe else images

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


def _encode(comps, vae_params, x, key, tiled: bool):
    """The posterior (jitted when not tiled: the tiled path jits its tiles) and a sample or its mean."""
    params = {"vae": vae_params}
    mean, logvar = C.encode_posterior(comps, params, x, tiled=True) if tiled else _posterior(comps, params, x)
    return C.sample_latents(comps, mean, logvar, key)


_posterior = jax.jit(C.encode_posterior, static_argnums=0)
_decode = jax.jit(lambda comps, vae_params, z: C.decode_latents(comps, {"vae": vae_params}, z), static_argnums=0)
