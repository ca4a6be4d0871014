"""sample.py's checks that need the model's configs but not its weights: the model path, image sizes, memory.

With a diffusers folder (the embedded model included) or ``--config-dir`` the configs are read before the
weights load; otherwise (a Hub id, a single file on shipped configs) the same checks run right after loading,
still before sampling.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys

from sd_jax.cli.sample_args import UsageError

DEFAULT_MODEL_ENV = "SD_JAX_DEFAULT_MODEL"


def model_path(args) -> str:
    """``--model`` (or the embedded model), checked as far as it can be without loading it."""
    model = args.model or os.environ.get(DEFAULT_MODEL_ENV)
    if model is None:
        from sd_jax.embedded import default_model_path

        model = default_model_path()
        if model is None:
            raise UsageError("no --model given and no embedded default model is installed ; pass --model FOLDER|FILE")
    p = pathlib.Path(model)
    if p.is_file() and p.name == "model_index.json":
        raise UsageError(f"--model {p} is the index of a diffusers folder ; pass the folder: --model {p.parent}")
    hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if not p.exists() and not hub_id:
        raise UsageError(
            f"--model {model}: no such file or folder ; pass a diffusers folder, a .safetensors or a Hub id"
        )
    if p.is_dir() and not (p / "model_index.json").is_file():
        raise UsageError(f"--model {p}: a folder without model_index.json ; pass a diffusers pipeline folder")
    if args.config_dir is not None:
        c = pathlib.Path(args.config_dir)
        if not p.is_file():
            raise UsageError("--config-dir applies to single-file checkpoints only ; drop it for folders and Hub ids")
        if not (c / "model_index.json").is_file():
            raise UsageError(f"--config-dir {c}: no model_index.json there ; pass a diffusers folder with the configs")
    return str(model)


def read_configs(model: str, config_dir: str | None):
    """(UNetConfig, VAEConfig, parameter count) from config files and weight headers alone, or None where they
    are not on disk yet (a Hub id; a single file, whose configs and count are known once it is loaded)."""
    from sd_jax.loading.diffusers import parameter_count, read_component_config

    p = pathlib.Path(model)
    if not p.is_dir():
        return None
    return read_component_config(p / "unet")[2], read_component_config(p / "vae")[2], parameter_count(p)


@dataclasses.dataclass
class Plan:
    """Pixel sizes of the run: the output size, and what the input image(s) are fitted to."""

    height: int
    width: int
    init_size: tuple[int, int] | None = None  # (width, height) --init-image/--mask-image are fitted to
    note: str | None = None
    hires: object = None  # the hires fix's sizes (sd_jax.pipelines.hires.Target), when it is on


def plan_sizes(args, unet, vae, upscaler: bool) -> Plan:
    """The sizes, checked against the VAE factor; an init image is fitted as diffusers/A1111 do."""
    from sd_jax.pipelines import images

    multiple = math.lcm(8, vae.downsample_factor)
    if not args.init_image:
        native = unet.sample_size * vae.downsample_factor
        h, w = args.height or native, args.width or native
        for flag, v in (("--height", h), ("--width", w)):
            if v % multiple:
                raise UsageError(
                    f"{flag} must be a positive multiple of {multiple}, got {v} ; "
                    f"e.g. {v // multiple * multiple or multiple}"
                )
        from sd_jax.cli import sample_hires

        hires = sample_hires.target(args, h, w, vae.downsample_factor) if sample_hires.enabled(args) else None
        return Plan(h, w, hires=hires)
    src = _image_size(args.init_image, "--init-image")
    if args.mask_image and _image_size(args.mask_image, "--mask-image") != src:
        m = _image_size(args.mask_image, "--mask-image")
        raise UsageError(
            f"--mask-image is {m[0]}x{m[1]} but --init-image is {src[0]}x{src[1]} ; give a mask of the image's size"
        )
    target = images.fitted_size(src, (args.width, args.height), multiple)
    note = None
    if target != src:
        how = "resized" if args.resize_mode == "resize" else "scaled and center-cropped"
        why = "to --width/--height" if (args.width or args.height) else f"to a multiple of {multiple}"
        other = "crop" if args.resize_mode == "resize" else "resize"
        note = (
            f"note: --init-image {src[0]}x{src[1]} {how} {why}: {target[0]}x{target[1]} "
            f"(--resize-mode {other} to {other} instead)"
        )
    scale = 4 if upscaler else 1
    return Plan(target[1] * scale, target[0] * scale, target, note)


def _image_size(path, flag) -> tuple[int, int]:
    from PIL import UnidentifiedImageError

    from sd_jax.pipelines import images

    try:
        return images.image_size(path)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{flag} {path}: not a readable image ({e})") from None


def check_memory(args, unet, vae, plan: Plan, batch: int, upscaler: bool, params: int) -> None:
    """Refuse, with the estimate, a run that cannot fit in this device's memory (or ``--max-memory-gb``); with the
    hires fix, its second pass at the hires size too (img2img: no micro-batches)."""
    import jax

    from sd_jax.cli.sample_args import TILING
    from sd_jax.pipelines.memory import device_memory_bytes, sampling_memory

    def estimate(height, width, micro_batch):
        return sampling_memory(
            unet, vae, batch=batch, height=height, width=width, guidance=args.guidance_scale > 1,
            micro_batch=micro_batch, tiled=TILING[args.vae_tiling], dtype_bytes=2 if args.dtype == "bfloat16" else 4,
            backend=jax.default_backend(), latent_factor=4 if upscaler else None, params=params,
        )  # fmt: skip

    budget = args.max_memory_gb * 2**30 if args.max_memory_gb is not None else device_memory_bytes()
    where = "--max-memory-gb" if args.max_memory_gb is not None else "this device's memory"
    est = estimate(plan.height, plan.width,
                   args.micro_batch if not (args.init_image or args.interpolate is not None) else None)  # fmt: skip
    if est.total > budget:
        raise UsageError(
            f"{plan.width}x{plan.height}, batch {batch}: estimated peak memory {est.describe()} exceeds {where} "
            f"({budget / 2**30:.3g} GiB) ; lower --height/--width or --batch-size (or use --micro-batch, "
            "--vae-tiling on), or raise --max-memory-gb if you know it fits"
        )
    if plan.hires is not None:
        (h, w) = plan.hires.up
        est = estimate(h, w, None)
        if est.total > budget:
            raise UsageError(
                f"the hires fix's {w}x{h} second pass, batch {batch}: estimated peak memory {est.describe()} "
                f"exceeds {where} ({budget / 2**30:.3g} GiB) ; lower --hires-scale (or --hires-width/--hires-height) "
                "or --batch-size (or use --vae-tiling on), or raise --max-memory-gb if you know it fits"
            )


def warn_native_size(unet, vae, plan: Plan, upscaler: bool) -> None:
    """One line when the size is far from what the model was trained at (it then repeats or breaks up subjects)."""
    if upscaler:
        return
    native = unet.sample_size * vae.downsample_factor
    ratios = (plan.height / native, plan.width / native)
    if max(ratios) > 2 or min(ratios) < 0.5:
        print(
            f"warning: {plan.width}x{plan.height} is far from the model's native {native}x{native}; expect repeated "
            f"or broken-up subjects (--height/--width near {native} give what it was trained for)",
            file=sys.stderr,
        )
