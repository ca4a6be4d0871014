"""sample.py's hires fix (A1111's ``Hires. fix``, :mod:`sd_jax.pipelines.hires`): its flag group, the checks that
run before any model loads, the hires size the memory check plans for, and the txt2img batch through
``pipe.hires_fix``.

The infotext fields go into each image's metadata under ``"infotext"`` with A1111's names (``Hires upscale``
or ``Hires resize``, ``Hires steps`` when given, ``Hires upscaler``, ``Denoising strength``); ``Size`` stays the
first pass's size, as A1111 writes it.
"""

from __future__ import annotations

from sd_jax.cli.sample_args import MAX_STEPS, UsageError, _number, positive_int
from sd_jax.pipelines import hires

SIZE_FLAGS = ("--hires-scale", "--hires-height", "--hires-width")
DEFAULTS = {"hires_steps": 0, "hires_denoise": 0.7, "hires_upscaler": "latent"}  # A1111's


def add_flags(parser) -> None:
    g = parser.add_argument_group(
        "hires fix",
        "A1111's Hires. fix (txt2img only): sample at --height/--width, upscale, then img2img at the larger size",
    )
    g.add_argument("--hires-scale", type=_number(float, 1.0), default=None,
                   help="upscale the first pass by this factor (A1111's 'Upscale by'), e.g. 2; each side must "
                   "come out a multiple of 8")  # fmt: skip
    g.add_argument("--hires-width", type=positive_int, default=None,
                   help="instead of --hires-scale: the width to upscale to (A1111's 'Resize width to'); alone it "
                   "keeps the aspect, with --hires-height it covers and crops to the centre")  # fmt: skip
    g.add_argument("--hires-height", type=positive_int, default=None, help="see --hires-width")
    g.add_argument("--hires-steps", type=_number(int, 0, MAX_STEPS, "whole number"), default=None,
                   help="second-pass steps; 0 (the default): --steps")  # fmt: skip
    g.add_argument("--hires-denoise", type=_number(float, 0.0, 1.0), default=None,
                   help="the second pass's denoising strength, in (0, 1] (default 0.7, as A1111)")  # fmt: skip
    g.add_argument("--hires-upscaler", choices=list(hires.UPSCALERS), default=None,
                   help="latent* resize the latents (A1111's Latent modes; latent is bilinear), lanczos/nearest the "
                   "decoded image (default latent)")  # fmt: skip


def enabled(args) -> bool:
    return any(getattr(args, f[2:].replace("-", "_"), None) is not None for f in SIZE_FLAGS)


def check(args) -> None:
    """Flag combinations and numbers, before any model loads; fills in the defaults of the hires flags."""
    options = [f"--{k.replace('_', '-')}" for k in DEFAULTS if getattr(args, k, None) is not None]
    if not enabled(args):
        if options:
            raise UsageError(f"{options[0]} needs --hires-scale (or --hires-width/--hires-height) ; add one to turn "
                             "the hires fix on")  # fmt: skip
        return
    if args.hires_scale is not None and (args.hires_width is not None or args.hires_height is not None):
        raise UsageError("--hires-scale and --hires-width/--hires-height both set the hires size ; give one of them")
    modes = [f for f, on in (("--init-image", args.init_image), ("--interpolate", args.interpolate is not None),
                             ("--upscale", args.upscale), ("--denoise", args.denoise)) if on]  # fmt: skip
    if modes:
        raise UsageError(f"the hires fix is txt2img only (as A1111's) ; drop {modes[0]} or the --hires-* flags")
    if args.save_steps is not None:
        raise UsageError("--save-steps does not apply to the hires fix ; drop it or the --hires-* flags")
    if getattr(args, "refiner", None) is not None:
        raise UsageError("--refiner with the hires fix is not supported yet ; drop --refiner or the --hires-* flags")
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.hires_denoise == 0:
        raise UsageError("--hires-denoise 0 leaves nothing for the second pass to do ; give a strength in (0, 1]")
    second = hires.second_pass(args.steps, args.hires_steps, args.hires_denoise)
    if second.steps > MAX_STEPS:
        raise UsageError(
            f"--hires-steps {second.sampled} at --hires-denoise {args.hires_denoise:g} walks a {second.steps}-step "
            f"grid (A1111: steps / denoise), over {MAX_STEPS} ; raise --hires-denoise or lower --hires-steps"
        )


def target(args, height: int, width: int, vae_factor: int) -> hires.Target:
    """The hires size from the base size; a size that is not a multiple of 8 (and the VAE factor) is a usage
    error naming scales that work."""
    try:
        return hires.target_size(height, width, scale=args.hires_scale, hires_height=args.hires_height,
                                 hires_width=args.hires_width, factor=vae_factor,
                                 names=("--hires-scale", "--hires-height", "--hires-width"))  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None


def txt2img(pipe, args, prompts, **kw):
    """One txt2img batch with the hires fix; ``kw`` are what sample.py passes ``pipe.txt2img`` (``height``,
    ``width``, ``micro_batch``, ``seed``, ...). Returns (images, None, extra metadata)."""
    kw.pop("record", None)
    outer = pipe.on_step
    if outer is not None:  # one bar over both passes, as A1111's total
        pipe.on_step = both_passes(outer, args.steps, hires.second_pass(args.steps, args.hires_steps,
                                                                        args.hires_denoise).sampled)  # fmt: skip
    try:
        images, info = pipe.hires_fix(prompts, scale=args.hires_scale, hires_height=args.hires_height,
                                      hires_width=args.hires_width, hires_steps=args.hires_steps,
                                      denoise=args.hires_denoise, upscaler=args.hires_upscaler, **kw)  # fmt: skip
    finally:
        pipe.on_step = outer
    return images, None, {"infotext": info["infotext"]}


def both_passes(on_step, first: int, second: int):
    """``on_step(step, total)`` counting the second pass's steps after the first pass's ``first``."""
    done = [False]

    def report(step: int, total: int) -> None:
        if done[0]:
            on_step(first + step, first + second)
        else:
            on_step(step, first + second)
            done[0] = step >= first

    return report
