"""``python sample.py``: every sampling mode from the command line.

Bad input ends with a one-line ``error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

DEFAULT_MODEL_ENV = "SD_JAX_DEFAULT_MODEL"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description="Sample images with sd-jax.")
    p.add_argument("--model", help="diffusers folder, single .safetensors file, or Hugging Face Hub id")
    p.add_argument("--prompt", action="append", help="prompt (repeat for several)")
    p.add_argument("--prompts-file", help="one prompt a line, sampled as one batch")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument(
        "--init-image", help="img2img (with --strength), inpaint (with --mask-image), denoise or upscale input"
    )
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--mask-image", help="inpainting mask: white = repaint")
    p.add_argument("--upscale", action="store_true", help="x4 upscale --init-image (needs an x4 upscaler model)")
    p.add_argument("--noise-level", type=int, default=20, help="upscale: noise added to the low-res image")
    p.add_argument("--denoise", action="store_true", help="restore a noisy --init-image by partial diffusion")
    p.add_argument("--denoise-level", type=float, default=None, help="latent noise sigma (default: estimated)")
    p.add_argument("--interpolate", metavar="PROMPT_B", nargs="?", const="", default=None,
                   help="frames between --seed and --seed+1 (and towards PROMPT_B if given); writes a GIF")  # fmt: skip
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--save-steps", type=str, default=None, help="comma-separated steps whose x0 estimate to save")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--no-safety-checker", action="store_true", help="skip the checkpoint's safety checker")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (can run code!)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA .safetensors (diffusers or kohya names) at SCALE (default 1); repeatable",
    )
    p.add_argument("--output-dir", default="out")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def prompts_from(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            fail(f"--prompts-file {path}: no such file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        fail("give --prompt or --prompts-file")
    return [p for p in prompts for _ in range(args.num_images)]


def lora_arg(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (a trailing ``:number``; paths may contain colons)."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            value = float(scale)
        except ValueError:
            path, value = spec, 1.0
    else:
        path, value = spec, 1.0
    if not pathlib.Path(path).exists():
        fail(f"--lora {path}: no such file")
    return path, value


def load_image(path, what, size=None):
    from PIL import UnidentifiedImageError

    from sd_jax.pipelines import images

    if not pathlib.Path(path).is_file():
        fail(f"{what} {path}: no such file")
    try:
        return (images.load_mask if what == "--mask-image" else images.load_image)(path, size)
    except (UnidentifiedImageError, OSError) as e:
        fail(f"{what} {path}: not a readable image ({e})")


def save(args, out_dir, imgs, prompts, mode, extra=None):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from sd_jax.pipelines import images

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images.to_uint8(imgs)):
        meta = {
            "prompt": prompts[i % len(prompts)],
            "negative_prompt": args.negative_prompt or "",
            "seed": args.seed,
            "index": i,
            "sampler": args.sampler,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "model": str(args.model),
            "mode": mode,
            **({"lora": args.lora} if args.lora else {}),
            **(extra or {}),
        }
        info = PngInfo()
        info.add_text("parameters", json.dumps(meta))
        path = out_dir / f"{mode}_{args.seed}_{i:04d}.png"
        Image.fromarray(img).save(path, pnginfo=info)
        paths.append(path)
    rows = int(np.ceil(np.sqrt(len(imgs))))
    Image.fromarray(images.to_uint8(images.make_grid(imgs, rows))).save(out_dir / f"{mode}_{args.seed}_grid.png")
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    model = args.model or os.environ.get(DEFAULT_MODEL_ENV)
    if model is None:
        from sd_jax.embedded import default_model_path

        model = default_model_path()
        if model is None:
            fail("no --model given and no embedded default model is installed yet; pass --model FOLDER|FILE|HUB_ID")
    args.model = model
    if not 0.0 <= args.strength <= 1.0:
        fail(f"--strength must be in [0, 1], got {args.strength}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            fail(f"--{name} must be a positive multiple of 8, got {v}")
    from sd_jax.sampling.registry import SAMPLERS

    if args.sampler not in SAMPLERS:
        fail(f"unknown --sampler {args.sampler!r}; choose from {', '.join(sorted(SAMPLERS))}")
    prompts = prompts_from(args)
    loras = [lora_arg(spec) for spec in args.lora]

    import jax

    cache = pathlib.Path(os.environ.get("SD_JAX_CACHE", pathlib.Path.home() / ".cache" / "sd_jax" / "jax"))
    jax.config.update("jax_compilation_cache_dir", str(cache))  # warm starts skip XLA compilation
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from sd_jax.errors import SDJaxError
    from sd_jax.pipelines.pipeline import StableDiffusion
    from sd_jax.sharding import make_mesh

    try:
        mesh = make_mesh((-1, 1, 1)) if len(jax.devices()) > 1 else None
        pipe = StableDiffusion.load(
            model,
            dtype=args.dtype,
            allow_pickle=args.allow_pickle,
            mesh=mesh,
            safety_checker=not args.no_safety_checker,
        )
        for path, scale in loras:
            pipe.load_lora(path, scale)
        out_dir = pathlib.Path(args.output_dir)
        common = dict(negative=args.negative_prompt, steps=args.steps, sampler=args.sampler, seed=args.seed)
        t0 = time.time()
        extra = None
        if args.interpolate is not None:
            from sd_jax.pipelines import images

            imgs, _ = pipe.interpolate(prompts[0], args.interpolate or None, frames=args.frames, seed_a=args.seed,
                                       seed_b=args.seed + 1, height=args.height, width=args.width, steps=args.steps,
                                       sampler=args.sampler, guidance_scale=args.guidance_scale)  # fmt: skip
            mode = "interpolate"
            gif = images.save_gif(imgs, out_dir / f"interpolate_{args.seed}.gif")
            print(f"wrote {gif}")
        elif args.upscale:
            if not args.init_image:
                fail("--upscale needs --init-image")
            low = load_image(args.init_image, "--init-image")
            imgs, _ = pipe.upscale(prompts, low, noise_level=args.noise_level, guidance_scale=args.guidance_scale,
                                   **common)  # fmt: skip
            mode = "upscale"
        elif args.mask_image:
            if not args.init_image:
                fail("--mask-image needs --init-image")
            image = load_image(args.init_image, "--init-image")
            mask = load_image(args.mask_image, "--mask-image")
            if mask.shape[:2] != image.shape[:2]:
                fail(
                    f"--mask-image is {mask.shape[1]}x{mask.shape[0]} "
                    f"but --init-image is {image.shape[1]}x{image.shape[0]}"
                )
            imgs, _ = pipe.inpaint(prompts, image, mask, guidance_scale=args.guidance_scale, **common)
            mode = "inpaint"
        elif args.denoise:
            if not args.init_image:
                fail("--denoise needs --init-image")
            image = load_image(args.init_image, "--init-image")
            imgs, extra = pipe.denoise(prompts, image, noise_level=args.denoise_level,
                                       guidance_scale=args.guidance_scale, **common)  # fmt: skip
            mode = "denoise"
        elif args.init_image:
            image = load_image(args.init_image, "--init-image")
            imgs, _ = pipe.img2img(prompts, image, strength=args.strength, guidance_scale=args.guidance_scale, **common)
            mode = "img2img"
        else:
            imgs, ds = pipe.txt2img(prompts, height=args.height, width=args.width, guidance_scale=args.guidance_scale,
                                    guidance_rescale=args.guidance_rescale, micro_batch=args.micro_batch,
                                    record=args.save_steps is not None, **common)  # fmt: skip
            mode = "txt2img"
            if args.save_steps is not None:
                from sd_jax.pipelines import images

                at = [int(s) for s in args.save_steps.split(",") if s.strip()]
                bad = [s for s in at if not 0 <= s < args.steps]
                if bad:
                    fail(f"--save-steps {bad} outside [0, {args.steps})")
                x0 = pipe.decode(np.concatenate([np.asarray(ds[s][:1]) for s in at]), safe=False)
                grid = images.make_grid(x0, 1)
                from PIL import Image

                out_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images.to_uint8(grid)).save(out_dir / f"progression_{args.seed}.png")
                print(f"wrote {out_dir / f'progression_{args.seed}.png'} (x0 at steps {at})")
        dt = time.time() - t0
        paths = save(args, out_dir, imgs, prompts, mode, extra)
        print(f"[{mode}] {len(paths)} image(s) in {dt:.1f}s -> {out_dir}/")
    except (SDJaxError, ValueError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0] if len(str(e).splitlines()) == 1 else str(e))
