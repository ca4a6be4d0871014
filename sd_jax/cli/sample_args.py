"""sample.py's flags and the checks that need no model: numbers, files, the output folder.

Every failure is a :class:`UsageError` with one line naming the flag and value and what to do;
``sd_jax.cli.sample`` prints it as ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import secrets

from sd_jax.models import conv_kernels
from sd_jax.models.attention_kernels import KERNELS
from sd_jax.sampling.registry import SAMPLERS, SCHEDULE_TYPES

MAX_STEPS = 1000  # diffusers' schedulers refuse more steps than num_train_timesteps (1000 in every SD release)
MAX_IMAGES = 100_000  # per run: the prompt list is built in memory
MAX_SEED = 2**32 - 1  # A1111's range; jax.random.key keeps only the low 32 bits of a larger seed
TILING = {"auto": None, "on": True, "off": False}


class UsageError(ValueError):
    """A flag's value is wrong; the message names it and says what to do."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, status 2, like ours
        raise UsageError(f"{message} ; see python sample.py --help")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, unless its help already says it or there is none (None, off, empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        none = action.default is None or action.default is False or action.default == []
        if "default" in text or none or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def _number(kind, lo=None, hi=None, what="number"):
    """An argparse type: ``kind(text)`` within [lo, hi], finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value

    return parse


def positive_int(text):
    return _number(int, 1, what="positive integer")(text)


def finite_float(text):
    return _number(float, what="number")(text)


def unit_float(text):
    return _number(float, 0.0, 1.0)(text)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="sample.py",
        formatter_class=Formatter,
        description="Sample images with sd-jax: txt2img, img2img, inpaint, denoise, x4 upscale, interpolation.",
        epilog="Images are written as NNNNN-SEED.png (numbered after the folder's existing files) with their "
        "parameters as A1111 infotext in the PNG text 'parameters' (python -m sd_jax.pnginfo IMG prints them); a "
        "grid NNNNN-grid.png sits beside them.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", help="diffusers folder, single .safetensors file or Hub id (default: the embedded model)")
    m.add_argument(
        "--config-dir",
        help="diffusers folder with the configs of a single file whose architecture "
        "does not ship (as python -m sd_jax.export takes)",
    )
    m.add_argument(
        "--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (they can run code; needs torch)"
    )
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="U-Net and text encoder dtype")
    add_device_flags(m)
    m.add_argument("--no-safety-checker", action="store_true", help="skip the checkpoint's safety checker")
    m.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA .safetensors (diffusers or kohya names) at SCALE (default 1); repeatable",
    )
    t = p.add_argument_group("prompts")
    t.add_argument("--prompt", action="append", help="prompt (repeat for several)")
    t.add_argument("--prompts-file", help="a text file, one prompt a line (blank lines skipped)")
    t.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    t.add_argument("--emphasis", choices=("a1111", "comfy", "none"), default="a1111",
                   help="how (word:1.2) weights act: a1111 (scale, restore the mean), comfy (lerp from the empty "
                        "prompt), none (parse, ignore weights)")  # fmt: skip
    t.add_argument("--max-prompt-chunks", type=positive_int, default=8,
                   help="longest prompt, in 75-token chunks (longer prompts are refused)")  # fmt: skip
    t.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    t.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="images sampled together; more prompts run in consecutive batches (batch k uses seed+k)",
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=_number(int, 1, MAX_STEPS, "whole number"), default=20, help="sampler steps")
    s.add_argument(
        "--sampler",
        default=None,
        choices=sorted(SAMPLERS),
        metavar="NAME",
        help="one of " + ", ".join(sorted(SAMPLERS)) + " (default: the folder's own scheduler)",
    )
    s.add_argument(
        "--schedule",
        default="default",
        choices=SCHEDULE_TYPES,
        help="sigma schedule type; default: the scheduler's own spacing",
    )
    s.add_argument("--guidance-scale", type=finite_float, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--guidance-rescale", type=unit_float, default=0.0, help="CFG rescale (Lin et al. 2023)")
    s.add_argument(
        "--clip-skip",
        type=positive_int,
        default=None,
        help="use the text encoder's output N layers before the last (also for the negative prompt)",
    )
    s.add_argument("--seed", type=_number(int, -1, MAX_SEED, "whole number"), default=0, help="-1: a random seed")
    s.add_argument(
        "--height",
        type=positive_int,
        default=None,
        help="pixels (default: the model's native size; with --init-image: the size it is resized to)",
    )
    s.add_argument("--width", type=positive_int, default=None, help="pixels; see --height")
    i = p.add_argument_group("image input")
    i.add_argument(
        "--init-image", help="img2img (with --strength), inpaint (with --mask-image), denoise or upscale input"
    )
    i.add_argument(
        "--resize-mode",
        default="resize",
        choices=["resize", "crop"],
        help="fit --init-image/--mask-image to a multiple of 8 (or --height/--width): resize, "
        "or scale to cover and center-crop",
    )
    i.add_argument("--strength", type=unit_float, default=0.8, help="img2img: how much of the image is re-noised")
    i.add_argument("--mask-image", help="inpainting mask: white = repaint")
    i.add_argument("--masked-content", default="original", choices=("original", "fill", "latent_noise",
                   "latent_nothing"), help="what the masked area starts from (A1111's Masked content)")  # fmt: skip
    i.add_argument("--upscale", action="store_true", help="x4 upscale --init-image (needs an x4 upscaler model)")
    i.add_argument(
        "--noise-level",
        type=_number(int, 0, what="whole number"),
        default=20,
        help="upscale: noise added to the low-res image",
    )
    i.add_argument("--denoise", action="store_true", help="restore a noisy --init-image by partial diffusion")
    i.add_argument(
        "--denoise-level",
        type=_number(float, 0.0),
        default=None,
        help="denoise: latent noise sigma (default: estimated from the image)",
    )
    c = p.add_argument_group("ControlNet")
    c.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a ControlNet (diffusers folder, single file or Hub id) at conditioning scale SCALE "
                   "(default 1); repeatable, matched in order with --control-image")  # fmt: skip
    c.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="the control map of the ControlNet at the same position (edges, depth, pose, scribble...), "
                   "resized to the output size; repeatable; with neither --controlnet nor --model: the "
                   "embedded pair")  # fmt: skip
    c.add_argument("--control-start", type=unit_float, default=0.0, help="fraction of the steps where they start")
    c.add_argument("--control-end", type=unit_float, default=1.0, help="fraction of the steps where they stop")
    c.add_argument("--guess-mode", action="store_true",
                   help="ControlNets on the conditional half of CFG only, weighted 0.1..1 (diffusers)")  # fmt: skip
    c.add_argument("--canny", action="store_true", help="turn each control image into canny edges (OpenCV 100/200)")
    o = p.add_argument_group("other outputs")
    o.add_argument(
        "--interpolate",
        metavar="PROMPT_B",
        nargs="?",
        const="",
        default=None,
        help="frames between --seed and --seed+1 (and towards PROMPT_B if given); writes a GIF",
    )
    o.add_argument("--frames", type=positive_int, default=8, help="interpolation frames")
    o.add_argument("--xy", action="append", default=[], metavar="AXIS=V1,V2,...",
                   help="an X/Y grid axis (give one or two): steps, guidance (cfg), sampler, schedule, seed, strength "
                   "or prompt (A1111's Prompt S/R: each value replaces the first in the prompt); ranges as A1111: "
                   "steps=10-30 (+10), guidance=3-11 [5]")  # fmt: skip
    o.add_argument("--format", default="png", choices=["png", "jpeg", "webp"],
                   help="image files; the parameters go in PNG text or the JPEG/WebP EXIF UserComment")  # fmt: skip
    o.add_argument("--from-image", metavar="IMG",
                   help="take the parameters (prompt, seed, steps, sampler, size, ...) from an image's A1111 "
                   "infotext and make it again; flags given too override them")  # fmt: skip
    o.add_argument(
        "--save-steps",
        default=None,
        metavar="I,J,...",
        help="txt2img: also save the x0 estimate of these steps (0-based) of the first image",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--vae-tiling",
        default="auto",
        choices=list(TILING),
        help="decode/encode tile by tile; auto: when larger than twice the VAE's native size",
    )
    r.add_argument("--micro-batch", type=positive_int, default=None, help="txt2img: U-Net batch chunk (bounds memory)")
    r.add_argument(
        "--max-memory-gb",
        type=_number(float, 0.0),
        default=None,
        help="refuse runs whose estimated peak memory exceeds this (default: this device's memory)",
    )
    r.add_argument("--output-dir", default="out", help="folder for the images (created if missing)")
    r.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def lora_arg(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE``: an existing file wins, so paths may contain colons."""
    if pathlib.Path(spec).is_file():
        return spec, 1.0
    path, sep, scale = spec.rpartition(":")
    if not sep:
        raise UsageError(f"--lora {spec}: no such file ; give an existing .safetensors, optionally FILE:SCALE")
    try:
        value = float(scale)
    except ValueError:
        msg = f"--lora {spec}: scale {scale!r} is not a number ; write FILE:SCALE, e.g. {path}:0.8"
        raise UsageError(msg) from None
    if not math.isfinite(value):
        raise UsageError(f"--lora {spec}: scale {scale!r} is not a finite number ; use e.g. {path}:0.8")
    if not pathlib.Path(path).is_file():
        raise UsageError(f"--lora {path}: no such file")
    return path, value


def read_prompts(args) -> list[str]:
    """Every prompt, in order, each repeated ``--num-images`` times."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file {path}: no such file")
        try:
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not prompts:
        raise UsageError("no prompt ; give --prompt TEXT or --prompts-file FILE")
    if len(prompts) * args.num_images > MAX_IMAGES:
        raise UsageError(
            f"{len(prompts)} prompt(s) x --num-images {args.num_images} is more than {MAX_IMAGES} images ; "
            "split the run into several"
        )
    return [p for p in prompts for _ in range(args.num_images)]


def save_steps(args) -> list[int] | None:
    if args.save_steps is None:
        return None
    try:
        at = [int(s) for s in args.save_steps.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--save-steps {args.save_steps!r}: not comma-separated whole numbers ; e.g. 0,5,10") from None
    bad = [s for s in at if not 0 <= s < args.steps]
    if not at or bad:
        raise UsageError(f"--save-steps {bad or args.save_steps!r} outside [0, {args.steps}) ; steps are 0-based")
    return at


def check_output_dir(path: pathlib.Path) -> None:
    """The folder (or its nearest existing parent, where it will be created) must be a writable folder."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UsageError(f"--output-dir {path}: {existing} is a broken link ; pick another folder")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise UsageError(f"--output-dir {path} {where} ; pick a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {path}: {existing} is not writable ; pick a folder you can write to")


def add_device_flags(group) -> None:
    """``--mesh``, ``--sharding``, ``--attention`` and ``--conv``: sample.py's and the server's."""
    group.add_argument(
        "--mesh",
        default=None,
        metavar="DATA,FSDP,TENSOR",
        help="device mesh shape (one size -1: the rest); default: every device on the data axis",
    )
    group.add_argument(
        "--sharding",
        default="dp",
        choices=["dp", "fsdp", "fsdp_tp"],
        help="weights on the mesh: dp replicates, fsdp/fsdp_tp split them (a model larger than one "
        "device), by the training rules",
    )
    group.add_argument("--attention", default="auto", choices=["auto", *KERNELS],
                       help="attention kernel; auto: blocked on CPU, cudnn on GPU, flash (Pallas) on TPU")  # fmt: skip
    group.add_argument("--conv", default="auto", choices=["auto", *conv_kernels.KERNELS],
                       help="U-Net convolution algorithm; auto: per shape on CPU (cpu), XLA's elsewhere")  # fmt: skip


def device_mesh(args):
    """The mesh of ``--mesh`` (None on one device), checked with ``--sharding`` before anything loads."""
    from sd_jax.sharding import mesh_from_flag

    try:
        mesh = mesh_from_flag(args.mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.sharding != "dp" and mesh is None:
        raise UsageError(f"--sharding {args.sharding} splits the weights over several devices ; this machine has one")
    return mesh


def check_args(args) -> None:
    """Combinations of flags, before anything is loaded."""
    args.device_mesh = device_mesh(args)
    if args.seed == -1:
        args.seed = secrets.randbelow(MAX_SEED + 1)
        print(f"seed: {args.seed} (random)")
    modes = [f for f, on in (("--interpolate", args.interpolate is not None), ("--upscale", args.upscale),
                             ("--mask-image", args.mask_image), ("--denoise", args.denoise)) if on]  # fmt: skip
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} are different modes ; give one of them")
    if args.interpolate is not None and args.init_image:
        raise UsageError("--interpolate starts from noise, not --init-image ; drop one of them")
    if args.upscale and (args.height or args.width):
        raise UsageError("--height/--width do not apply to --upscale ; the output is 4x --init-image")
    needs_init = [
        f
        for f, on in (("--upscale", args.upscale), ("--mask-image", args.mask_image), ("--denoise", args.denoise))
        if on
    ]
    if needs_init and not args.init_image:
        raise UsageError(f"{needs_init[0]} needs --init-image ; give the image to work on")
    if args.save_steps is not None and (args.init_image or args.interpolate is not None):
        raise UsageError("--save-steps works with txt2img only ; drop it or --init-image/--interpolate")
    if args.micro_batch and args.batch_size % args.micro_batch:
        raise UsageError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}")
    for flag in ("init_image", "mask_image"):
        value = getattr(args, flag)
        if value and not pathlib.Path(value).is_file():
            raise UsageError(f"--{flag.replace('_', '-')} {value}: no such file")
    check_output_dir(pathlib.Path(args.output_dir))
