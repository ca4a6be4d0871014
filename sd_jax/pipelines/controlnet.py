"""ControlNet in the one pipeline (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"), as diffusers' ``StableDiffusion[XL]ControlNet[Img2Img|Inpaint]Pipeline`` runs it.

``ControlNets`` is mixed into :class:`~sd_jax.pipelines.pipeline.StableDiffusion`: ``pipe.load_controlnet(path or
[paths])`` (or ``StableDiffusion.load(model, controlnet=...)``) checks each net against the U-Net
(:func:`sd_jax.loading.controlnet.check_base`) and puts its weights in ``pipe.params["controlnet"]``, a tuple with
one params dict per net. The txt2img, img2img and inpaint modes then take diffusers' arguments: ``control_image``
(one per net), ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``control_guidance_end`` (fractions
of the steps, per net) and ``guess_mode``.

Everything runs in the one jitted loop: :func:`request` checks and reads the request before any compute,
:func:`control_conditioning` turns it into a ``"control"`` entry of the conditioning (control images, per-net
scales and diffusers' ``controlnet_keep`` table, all traced, so a new image, scale or start/end does not
recompile), and :func:`unet_residuals`, called inside the pipeline's model function, runs every net on the
step's latents and sums the scaled residuals into the U-Net's extra arguments. The loop tells the model the step
it is at (``cond["step"]``). Guess mode keeps the nets off the unconditional half of the CFG batch (their
residuals there are zeros, as diffusers concatenates) and weights the residuals by ``logspace(-1, 0)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from sd_jax.control_image import load_control_image, resize_control_image
from sd_jax.models.controlnet import ControlNetModel, guess_mode_scales


class ControlNets:
    """Mixin: loading and holding the pipeline's ControlNets (see the module docstring)."""

    controlnets: tuple = ()  # ControlNetModel modules, one per net; their params are params["controlnet"]
    controlnet_sources: tuple = ()  # where each was loaded from

    def load_controlnet(self, path, *, allow_pickle: bool = False):
        """Load one ControlNet (a diffusers folder, Hub id or single file) or a list of them, replacing those
        loaded before; each must be built for this pipeline's U-Net. Returns their configs."""
        from sd_jax.loading.controlnet import check_base, load_controlnet

        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        dtype = self.unet.param_dtype
        nets = []
        for p in paths:
            config, params = load_controlnet(p, dtype=dtype, allow_pickle=allow_pickle)
            check_base(config, self.unet.config, str(p))
            nets.append((config, params))
        self.set_controlnet(nets, sources=[str(p) for p in paths])
        return [c for c, _ in nets]

    def set_controlnet(self, nets: Sequence[tuple], sources: Sequence[str] | None = None) -> None:
        """In-memory ControlNets: ``[(ControlNetConfig, params), ...]`` (a trainer's); ``[]`` removes them."""
        from sd_jax.loading.controlnet import check_base

        for i, (config, _) in enumerate(nets):
            check_base(config, self.unet.config, (sources or [f"controlnet {i}"] * len(nets))[i])
        kw = {
            "query_chunk_size": self.unet.query_chunk_size,
            "attention": self.unet.attention,
            "conv": self.unet.conv,
        }  # the U-Net's
        self.controlnets = tuple(
            ControlNetModel(c, dtype=self.unet.dtype, param_dtype=self.unet.param_dtype, **kw) for c, _ in nets
        )
        self.controlnet_sources = tuple(sources or ("",) * len(nets))
        self.params.pop("controlnet", None)
        if nets:
            self.params["controlnet"] = tuple(p for _, p in nets)

    def unload_controlnet(self) -> None:
        self.set_controlnet([])


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked ControlNet request: the control images as read (one per net) and per-net numbers."""

    images: tuple
    scale: tuple[float, ...]
    start: tuple[float, ...]
    end: tuple[float, ...]
    guess_mode: bool


def _per_net(value, k: int, what: str) -> tuple[float, ...]:
    vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * k
    if len(vals) != k:
        raise ValueError(f"{what} has {len(vals)} values for {k} ControlNet(s); pass one number or one per net")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"{what} must be finite numbers, got {v!r}")
        out.append(float(v))
    return tuple(out)


def _image_list(control_image, k: int) -> list:
    if isinstance(control_image, (list, tuple)):
        images = list(control_image)
    else:
        images = [control_image]
    if len(images) != k:
        raise ValueError(f"{len(images)} control image(s) for {k} ControlNet(s); pass one control image per net")
    return images


def request(pipe, control_image, scale=1.0, start=0.0, end=1.0, guess_mode: bool = False) -> Request | None:
    """Check a mode's ControlNet arguments and read the control images, before any compute (None: no control)."""
    k = len(pipe.controlnets)
    if control_image is None:
        return None
    if not k:
        raise ValueError("control_image given but no ControlNet is loaded: pipe.load_controlnet(path) or "
                         "StableDiffusion.load(model, controlnet=path)")  # fmt: skip
    images = _image_list(control_image, k)
    scale = _per_net(scale, k, "controlnet_conditioning_scale")
    start, end = _per_net(start, k, "control_guidance_start"), _per_net(end, k, "control_guidance_end")
    for s, e in zip(start, end):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start {s} and control_guidance_end {e}: need 0 <= start < end <= 1")
    read = []
    for i, im in enumerate(images):
        a = np.asarray(im) if not isinstance(im, (str, os.PathLike)) and np.ndim(im) == 4 else None
        read.append([load_control_image(x) for x in a] if a is not None else load_control_image(im))
        if a is not None and not len(a):
            raise ValueError(f"control image {i} is an empty batch")
    guess = bool(guess_mode) or pipe.controlnets[0].config.global_pool_conditions  # as diffusers
    return Request(tuple(read), scale, start, end, guess)


def default_size(pipe, req: Request) -> tuple[int, int]:
    """txt2img's size without height/width: the first control image's, rounded down to the sizes we sample."""
    first = req.images[0][0] if isinstance(req.images[0], list) else req.images[0]
    h, w = first.shape[:2] if isinstance(first, np.ndarray) else first.size[::-1]
    f = math.lcm(8, pipe.vae_scale_factor)
    if h < f or w < f:
        raise ValueError(f"control image is {h}x{w}; give height and width (multiples of {f})")
    return h - h % f, w - w % f


def keep_table(start: Sequence[float], end: Sequence[float], steps: int, first: int) -> np.ndarray:
    """diffusers' ``controlnet_keep``: ``[steps, nets]``, 1 where a net acts at (absolute) step i; the steps
    counted are those sampled, from ``first`` (img2img's start) on."""
    n = steps - first
    table = np.zeros((steps, len(start)), np.float32)
    for i in range(n):
        table[first + i] = [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(start, end)]
    return table


def control_conditioning(pipe, req: Request, n: int, height: int, width: int, steps: int, first: int) -> dict:
    """The ``"control"`` conditioning of ``n`` samples at ``height x width`` (every leaf has the batch axis, so
    micro-batches and the mesh split it as the rest of the conditioning)."""
    images = []
    for i, im in enumerate(req.images):
        batch = np.stack([resize_control_image(x, height, width) for x in (im if isinstance(im, list) else [im])])
        if batch.shape[0] not in (1, n):
            raise ValueError(f"control image {i} has a batch of {batch.shape[0]} for {n} prompt(s)")
        images.append(jnp.broadcast_to(jnp.asarray(batch), (n, height, width, 3)))
    k = len(req.images)
    keep = keep_table(req.start, req.end, steps, first)
    return {
        "image": tuple(images),
        "scale": jnp.broadcast_to(jnp.asarray(req.scale, jnp.float32), (n, k)),
        "keep": jnp.broadcast_to(jnp.asarray(keep), (n, steps, k)),
        "guess": jnp.full((n,), float(req.guess_mode), jnp.float32),
        "on": jnp.ones((n,), jnp.float32),
    }


def attach(control: dict, cond: dict, uncond: dict | None) -> tuple[dict, dict | None]:
    """Add the control to both halves of CFG; in guess mode the unconditional half gets no residuals."""
    cond = {**cond, "control": control}
    if uncond is not None:
        uncond = {**uncond, "control": {**control, "on": control["on"] * (1.0 - control["guess"])}}
    return cond, uncond


def unet_residuals(nets: Sequence, params: Sequence, x, t, c) -> dict:
    """Inside the model function: every net on the (scaled, 4-channel) latents ``x`` at timestep ``t``; their
    residuals, each weighted by its scale, the keep factor of the step ``c["step"]``, the CFG-half switch and
    guess mode's weights, summed into the U-Net's ``down_block_additional_residuals`` /
    ``mid_block_additional_residual``."""
    ctl = c["control"]
    keep = jnp.take(ctl["keep"], c["step"], axis=1)  # [B, nets]
    total_down, total_mid = None, None
    for k, (net, p) in enumerate(zip(nets, params)):
        down, mid = net.apply({"params": p}, x, t, c["context"], ctl["image"][k],
                              text_embeds=c.get("text_embeds"), time_ids=c.get("time_ids"))  # fmt: skip
        f = ctl["scale"][:, k] * keep[:, k] * ctl["on"]
        pooled = net.config.global_pool_conditions
        g = np.ones(len(down) + 1, np.float32) if pooled else guess_mode_scales(len(down))
        w = [(f * jnp.where(ctl["guess"] > 0, g[j], 1.0))[:, None, None, None] for j in range(len(down) + 1)]
        down = [(d * w[j]).astype(d.dtype) for j, d in enumerate(down)]
        mid = (mid * w[-1]).astype(mid.dtype)
        total_down = down if total_down is None else [a + b for a, b in zip(total_down, down)]
        total_mid = mid if total_mid is None else total_mid + mid
    return {"down_block_additional_residuals": tuple(total_down), "mid_block_additional_residual": total_mid}
