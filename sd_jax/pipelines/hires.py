"""Hires fix, as AUTOMATIC1111's ``Hires. fix`` (``StableDiffusionProcessingTxt2Img.sample_hr_pass``): sample at
the base size, upscale, then img2img at the larger size. Both passes are the pipeline's own modes: the first is
``pipe.txt2img(..., output_type="latent")``, the second ``pipe.img2img``.

- **Upscalers.** The ``Latent`` modes resize the first pass's latents as A1111's
  ``torch.nn.functional.interpolate(samples, size=..., mode=..., antialias=...)`` (``align_corners`` unset)
  does; :func:`resize_latents` builds torch's separable weights. ``Lanczos`` and ``Nearest`` decode the first pass,
  quantize it to 8 bits by truncation (A1111's ``astype(np.uint8)``), resize with Pillow, and the second pass
  encodes that image (the posterior sample, as A1111's ``images_tensor_to_samples``).
- **Size.** ``int(base * scale)`` on each side (A1111), or a given hires width and/or height: one side keeps the
  aspect; both upscale to cover and crop the latents to the centre (A1111's ``truncate_x/y``). Each upscaled side
  must be a multiple of 8 and of the VAE factor; otherwise a ``ValueError`` names a valid scale.
- **Steps.** A1111 passes the second pass its step count (``hr_second_pass_steps`` or, when 0, the first pass's),
  so its ``setup_img2img_steps`` always takes the fixed-steps branch: a grid of ``T = int(N / min(denoise,
  0.999))`` steps of which the last ``N`` run. Our img2img starts at ``T - int(T * strength)``;
  :func:`second_pass` picks ``strength = min(1, (N + 0.5) / T)``, which gives exactly ``N`` steps on that grid.
  (When ``int(T * denoise) == N``, e.g. N=10 at 0.5, that is plain ``img2img(steps=T, strength=denoise)``.)
- **Noise.** The second pass reuses the seed and draws fresh noise at the new shape (A1111 builds a new
  ``ImageRNG`` from the same seeds for the upscaled shape): img2img's own draws for that seed.
- **Conditioning.** The prompts are encoded again at the new size, so SDXL's size micro-conditioning is the
  hires size, as A1111's ``calculate_hr_conds``; ControlNet images are resized to the new size by img2img.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from sd_jax.pipelines import starts


@dataclasses.dataclass(frozen=True)
class Upscaler:
    name: str  # A1111's name, as its infotext writes it ("Hires upscaler: Latent")
    mode: str | None  # torch interpolate mode for latent upscalers; None: a Pillow filter on the decoded image
    antialias: bool = False
    pil: str | None = None  # PIL.Image.Resampling member name


UPSCALERS = {  # CLI name -> A1111 upscaler (modules/shared.py latent_upscale_modes, plus the PIL ones)
    "latent": Upscaler("Latent", "bilinear"),
    "latent-antialiased": Upscaler("Latent (antialiased)", "bilinear", True),
    "latent-bicubic": Upscaler("Latent (bicubic)", "bicubic"),
    "latent-bicubic-antialiased": Upscaler("Latent (bicubic antialiased)", "bicubic", True),
    "latent-nearest": Upscaler("Latent (nearest)", "nearest"),
    "latent-nearest-exact": Upscaler("Latent (nearest-exact)", "nearest-exact"),
    "lanczos": Upscaler("Lanczos", None, pil="LANCZOS"),
    "nearest": Upscaler("Nearest", None, pil="NEAREST"),
}


def get_upscaler(name: str | Upscaler) -> Upscaler:
    """An upscaler by CLI name (``latent-nearest``) or A1111 name (``Latent (nearest)``), case-insensitive."""
    if isinstance(name, Upscaler):
        return name
    key = str(name).strip().lower()
    for cli, up in UPSCALERS.items():
        if key in (cli, up.name.lower()):
            return up
    raise ValueError(f"unknown hires upscaler {name!r} ; use one of {', '.join(UPSCALERS)}")


# -- sizes and steps --


@dataclasses.dataclass(frozen=True)
class Target:
    """The hires pass's sizes in pixels: what the first pass is upscaled to, and the centre crop of that."""

    up: tuple[int, int]  # (height, width) upscaled to
    crop: tuple[int, int] = (0, 0)  # (rows, columns) of latents cut off (A1111's truncate_y, truncate_x)
    factor: int = 8  # pixels per latent

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the result."""
        return self.up[0] - self.crop[0] * self.factor, self.up[1] - self.crop[1] * self.factor


def _fmt(x: float) -> str:
    return f"{x:.10g}"


def target_size(height: int, width: int, *, scale: float | None = None, hires_height: int | None = None,
                hires_width: int | None = None, factor: int = 8,
                names=("scale", "hires height", "hires width")) -> Target:  # fmt: skip
    """A1111's ``calculate_target_resolution`` from the base ``height`` x ``width``; ``names`` name the inputs in
    the error (the CLI passes its flags)."""
    multiple = math.lcm(8, factor)
    if hires_height is None and hires_width is None:
        scale = 2.0 if scale is None else float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{names[0]} {scale!r} must be a positive number ; e.g. 2")
        exact = (height * scale, width * scale)
        if all(v.is_integer() and v % multiple == 0 for v in exact):
            return Target((int(exact[0]), int(exact[1])), factor=factor)
        step = multiple / math.gcd(height, width)  # the scales that keep both sides multiples of `multiple`
        ok = sorted({max(1, math.floor(scale / step)), math.ceil(scale / step)})
        alt = " or ".join(f"{_fmt(k * step)} ({round(width * k * step)}x{round(height * k * step)})" for k in ok)
        raise ValueError(
            f"{names[0]} {_fmt(scale)} turns {width}x{height} into {_fmt(exact[1])}x{_fmt(exact[0])}, not multiples "
            f"of {multiple} ; use {names[0]} {alt}, or give {names[2]}/{names[1]}"
        )
    for name, v in ((names[1], hires_height), (names[2], hires_width)):
        if v is not None and (v <= 0 or v % multiple):
            raise ValueError(
                f"{name} {v} must be a positive multiple of {multiple} ; e.g. {max(1, v // multiple) * multiple}"
            )
    if hires_height is None:
        up, crop = (hires_width * height // width, hires_width), (0, 0)
    elif hires_width is None:
        up, crop = (hires_height, hires_height * width // height), (0, 0)
    else:  # cover, then crop the latents to the centre
        if width / height < hires_width / hires_height:
            up = (hires_width * height // width, hires_width)
        else:
            up = (hires_height, hires_height * width // height)
        crop = ((up[0] - hires_height) // factor, (up[1] - hires_width) // factor)
    if up[0] % multiple or up[1] % multiple:
        raise ValueError(
            f"{names[2]}/{names[1]} keep the {width}x{height} aspect at {up[1]}x{up[0]}, not multiples of {multiple} ; "
            f"give both {names[2]} and {names[1]}, or a {names[0]}"
        )
    return Target(up, crop, factor)


@dataclasses.dataclass(frozen=True)
class SecondPass:
    steps: int  # the grid's step count T = int(N / min(denoise, 0.999))
    strength: float  # the img2img strength that starts that grid N steps before its end
    sampled: int  # N, the steps the second pass runs

    @property
    def start(self) -> int:
        return self.steps - self.sampled


def second_pass(steps: int, hires_steps: int, denoise: float) -> SecondPass:
    """A1111's second pass steps (``setup_img2img_steps`` with explicit steps), as our img2img's steps/strength."""
    if not 0.0 < float(denoise) <= 1.0:
        raise ValueError(f"hires denoising strength must be in (0, 1], got {denoise!r}")
    if isinstance(hires_steps, bool) or int(hires_steps) != hires_steps or hires_steps < 0:
        raise ValueError(f"hires steps must be a whole number >= 0 (0: the first pass's {steps}), got {hires_steps!r}")
    n = int(hires_steps) or int(steps)
    total = int(n / min(float(denoise), 0.999))
    return SecondPass(total, min(1.0, (n + 0.5) / total), n)


# -- upscaling --


def _cubic(x, a):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))  # fmt: skip


def resize_weights(n_in: int, n_out: int, mode: str, antialias: bool = False) -> np.ndarray:
    """``[n_out, n_in]`` weights of ``torch.nn.functional.interpolate(size=n_out, mode=mode, antialias=...)`` along
    one axis (``align_corners`` unset): nearest / nearest-exact index, bilinear with the source index clamped,
    bicubic (Keys a=-0.75, replicated border), and the antialiased filters (triangle / cubic a=-0.5, the support
    widened by the downscale factor, weights normalized over the pixels inside)."""
    w = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    scale32 = np.float32(n_in) / np.float32(n_out)  # torch computes the scale in float
    scale = float(scale32)
    if mode in ("nearest", "nearest-exact"):
        off = np.float32(0.5 if mode == "nearest-exact" else 0.0)
        src = np.floor((rows.astype(np.float32) + off) * scale32).astype(np.int64)
        w[rows, np.minimum(src, n_in - 1)] = 1.0
        return w
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"unknown interpolation mode {mode!r}")
    if antialias:
        support = (1.0 if mode == "bilinear" else 2.0) * max(scale, 1.0)
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in rows:
            center = scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            x = (np.arange(lo, hi) - center + 0.5) * inv
            k = np.maximum(0.0, 1.0 - np.abs(x)) if mode == "bilinear" else _cubic(x, -0.5)
            w[i, lo:hi] = k / k.sum()
        return w
    src = scale * (rows + 0.5) - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0.0)
        x0 = src.astype(np.int64)
        lam = src - x0
        x1 = np.minimum(x0 + 1, n_in - 1)
        np.add.at(w, (rows, x0), 1.0 - lam)
        np.add.at(w, (rows, x1), lam)
        return w
    x0 = np.floor(src).astype(np.int64)
    t = src - x0
    for d in (-1, 0, 1, 2):
        np.add.at(w, (rows, np.clip(x0 + d, 0, n_in - 1)), _cubic(t - d, -0.75))
    return w


def resize_latents(latents, size: tuple[int, int], upscaler: str | Upscaler = "latent"):
    """NHWC latents resized to ``size`` (h, w) as A1111's latent upscalers (:func:`resize_weights`)."""
    up = get_upscaler(upscaler)
    if up.mode is None:
        raise ValueError(f"{up.name} upscales images, not latents")
    z = jnp.asarray(latents, jnp.float32)
    wh = jnp.asarray(resize_weights(z.shape[1], size[0], up.mode, up.antialias), jnp.float32)
    ww = jnp.asarray(resize_weights(z.shape[2], size[1], up.mode, up.antialias), jnp.float32)
    return jnp.einsum("oh,nhwc,pw->nopc", wh, z, ww, precision="highest")


def resize_images(images, target: Target, upscaler: str | Upscaler = "lanczos") -> np.ndarray:
    """Decoded [0, 1] NHWC images -> 8-bit-quantized (truncated, as A1111), resized with Pillow to ``target.up``,
    centre-cropped to ``target.size`` (A1111 crops the latents instead), back to [0, 1] floats."""
    from PIL import Image

    up = get_upscaler(upscaler)
    if up.pil is None:
        raise ValueError(f"{up.name} upscales latents, not images")
    (h, w), (ch, cw), f = target.up, target.crop, target.factor
    top, left = ch // 2 * f, cw // 2 * f
    out = []
    for img in (255.0 * np.clip(np.asarray(images, np.float32), 0, 1)).astype(np.uint8):
        big = np.asarray(Image.fromarray(img).resize((w, h), getattr(Image.Resampling, up.pil)))
        out.append(big[top : top + target.size[0], left : left + target.size[1]])
    return np.stack(out).astype(np.float32) / 255.0


# -- the two passes --

FIRST_PASS_ONLY = ("height", "width", "micro_batch", "noise", "image")  # txt2img's own arguments


def infotext(upscaler: str | Upscaler, hires_steps: int, denoise: float, scale=None, hires_height=None,
             hires_width=None) -> dict:  # fmt: skip
    """A1111's infotext fields of a hires run (its names; ``Hires steps`` only when set, as A1111)."""
    out = {}
    if hires_height is None and hires_width is None:
        s = 2.0 if scale is None else float(scale)
        out["Hires upscale"] = int(s) if s.is_integer() else s
    else:
        out["Hires resize"] = f"{hires_width or 0}x{hires_height or 0}"
    if hires_steps:
        out["Hires steps"] = int(hires_steps)
    out["Hires upscaler"] = get_upscaler(upscaler).name
    out["Denoising strength"] = float(denoise)
    return out


def hires_fix(pipe, prompts, *, scale: float | None = None, hires_height: int | None = None,
              hires_width: int | None = None, hires_steps: int = 0, denoise: float = 0.7,
              upscaler: str | Upscaler = "latent", steps: int = 20, seed: int = 0, **kw):  # fmt: skip
    """A1111's hires fix: ``pipe.txt2img(prompts, steps=steps, seed=seed, **kw)``, upscaled by ``scale`` (default
    2) or to ``hires_width``/``hires_height``, then ``pipe.img2img`` there (see the module docstring for steps,
    noise and sizes). ``kw`` are txt2img's options (``height``, ``width``, ``negative``, ``sampler``,
    ``guidance_scale``, ControlNet and IP-Adapter arguments...); those img2img takes go to the second pass too.
    ``denoise`` defaults to A1111's 0.7. Returns ``(images, info)``: ``info`` has the sizes, the second pass's
    grid and the A1111 ``infotext`` fields."""
    up = get_upscaler(upscaler)
    if pipe.is_inpaint_unet or pipe.is_upscaler:
        raise ValueError(f"{pipe.source}: the hires fix needs a text-to-image model (this U-Net takes extra channels)")
    if kw.get("record"):
        raise ValueError("record= (per-step x0) is not available with the hires fix")
    if kw.pop("output_type", None) not in (None, "np"):
        raise ValueError("the hires fix returns images (output_type='np'); latents of its second pass are not offered")
    pipe.check_request(steps, kw.get("guidance_scale", 7.5))
    second = second_pass(steps, hires_steps, denoise)
    f = pipe.vae_scale_factor
    sizes = dict(scale=scale, hires_height=hires_height, hires_width=hires_width, factor=f)
    control = kw.get("image") if kw.get("image") is not None else kw.get("control_image")
    if kw.get("height") is not None or kw.get("width") is not None or control is None:
        target_size(*starts.default_size(pipe, kw.get("height"), kw.get("width")), **sizes)  # refuse before sampling
    z, _ = pipe.txt2img(prompts, steps=steps, seed=seed, output_type="latent", **kw)
    base = (z.shape[1] * f, z.shape[2] * f)
    target = target_size(*base, **sizes)
    later = {k: v for k, v in kw.items() if k not in FIRST_PASS_ONLY}
    if kw.get("image") is not None:  # txt2img's name for the control image
        later["control_image"] = kw["image"]
    h, w = target.size
    if up.mode is not None:
        z = resize_latents(z, (target.up[0] // f, target.up[1] // f), up)
        (ch, cw) = target.crop
        z = z[:, ch // 2 : z.shape[1] - (ch + 1) // 2, cw // 2 : z.shape[2] - (cw + 1) // 2]
        image = np.zeros((h, w, 3), np.float32)  # img2img takes only its size when given the latents
        images, _ = pipe.img2img(prompts, image, init_latents=z, strength=second.strength, steps=second.steps,
                                 seed=seed, **later)  # fmt: skip
    else:
        first = pipe.decode(z, tiled=kw.get("tiled"), safe=False)
        image = resize_images(first, target, up)
        images, _ = pipe.img2img(prompts, image, strength=second.strength, steps=second.steps, seed=seed, **later)
    info = {"first_pass_size": base, "size": (h, w), "steps": second.sampled, "grid_steps": second.steps,
            "start_step": second.start,
            "infotext": infotext(up, hires_steps, denoise, scale, hires_height, hires_width)}  # fmt: skip
    return images, info
