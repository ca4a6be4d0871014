"""sample.py's SDXL refiner (:mod:`sd_jax.pipelines.refiner`): its flag group, the checks that run before any model
loads, loading the refiner, and the txt2img batch through the base->refiner handoff.

The infotext fields go into each image's metadata under ``"infotext"`` with A1111's names (``Refiner``: the
refiner's name and hash, never its path; ``Refiner switch at``).
"""

from __future__ import annotations

import pathlib

from sd_jax.cli.sample_args import UsageError, _number
from sd_jax.pipelines import refiner as R

DEFAULTS = {"refiner_start": 0.8, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}  # diffusers'


def add_flags(parser) -> None:
    g = parser.add_argument_group(
        "SDXL refiner",
        "txt2img on an SDXL base: the base samples until --refiner-start of the schedule, the refiner finishes "
        "(diffusers' denoising_end/denoising_start; A1111's Refiner)",
    )
    g.add_argument("--refiner", metavar="PATH", default=None,
                   help="an SDXL refiner: a diffusers folder, a Hub id, or sd_xl_refiner_1.0.safetensors")  # fmt: skip
    g.add_argument("--refiner-start", type=_number(float, 0.0, 1.0), default=None,
                   help="the fraction of the schedule the base samples before the refiner takes over, in (0, 1) "
                   "(A1111's 'Switch at'; default 0.8)")  # fmt: skip
    g.add_argument("--aesthetic-score", type=_number(float), default=None,
                   help="the refiner's aesthetic-score conditioning (default 6.0, as diffusers)")  # fmt: skip
    g.add_argument("--negative-aesthetic-score", type=_number(float), default=None,
                   help="the same for the negative prompt (default 2.5)")  # fmt: skip


def enabled(args) -> bool:
    return getattr(args, "refiner", None) is not None


def check(args, model) -> None:
    """Flags, and what the refiner's and the base's files say they are, before any model loads; fills in the
    defaults. ``model`` is the base's path or Hub id."""
    options = [f"--{k.replace('_', '-')}" for k in DEFAULTS if getattr(args, k, None) is not None]
    if not enabled(args):
        if options:
            raise UsageError(f"{options[0]} needs --refiner PATH ; add the SDXL refiner or drop {options[0]}")
        return
    modes = [f for f, on in (("--init-image", args.init_image), ("--interpolate", args.interpolate is not None),
                             ("--upscale", args.upscale), ("--denoise", args.denoise),
                             ("--hires-scale", getattr(args, "hires_scale", None) is not None),
                             ("--save-steps", args.save_steps is not None)) if on]  # fmt: skip
    if modes:
        raise UsageError(f"--refiner runs after an SDXL base's txt2img ; drop {modes[0]} or --refiner")
    base_only = [f for f, on in (("--controlnet", getattr(args, "controlnet", None)),
                                 ("--ip-adapter", getattr(args, "ip_adapter", None))) if on]  # fmt: skip
    if base_only:
        raise UsageError(f"{base_only[0]} conditions the base only and the refiner has none ; drop it or --refiner")
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not 0.0 < args.refiner_start < 1.0:
        raise UsageError(f"--refiner-start {args.refiner_start:g} leaves one model nothing to do ; give a fraction "
                         "strictly between 0 and 1, e.g. 0.8")  # fmt: skip
    p = pathlib.Path(args.refiner)
    if not p.exists() and (p.suffix in (".safetensors", ".ckpt") or p.is_absolute()):  # else a Hub id
        raise UsageError(f"--refiner {args.refiner}: no such file or folder")
    try:
        R.check_refiner_path(args.refiner, model)
    except R.RefinerError as e:
        raise UsageError(f"--refiner {e}") from None


def load(args, load_pipeline, base):
    """The refiner pipeline, loaded as sample.py loads the base (``load_pipeline(args, path)``), with the base
    pipeline's prompt settings (emphasis, chunk cap)."""
    refiner = load_pipeline(args, args.refiner)
    refiner.emphasis, refiner.max_prompt_chunks = base.emphasis, base.max_prompt_chunks
    return refiner


def infotext(args) -> dict:
    """A1111's fields: ``Refiner`` is the checkpoint's short title, ``name [first 10 hex of its SHA-256]`` (the
    name alone when the hash is unknown, e.g. an uncached Hub id); ``Refiner switch at`` the fraction."""
    from sd_jax import hashing

    digest = hashing.model_hash(args.refiner)
    title = hashing.model_name(args.refiner) + (f" [{digest}]" if digest else "")
    return {"Refiner": title, "Refiner switch at": args.refiner_start}


def txt2img(pipe, refiner, args, prompts, **kw):
    """One txt2img batch through the handoff; ``kw`` are what sample.py passes ``pipe.txt2img`` (``height``,
    ``width``, ``seed``, ...). Returns (images, None, extra metadata)."""
    for k in ("record", "micro_batch"):
        kw.pop(k, None)
    outer = pipe.on_step
    if outer is not None:  # one bar over both models' steps
        refiner.on_step = lambda step, total: outer(args.steps - total + step, args.steps)
    try:
        images = R.refine(pipe, refiner, prompts, switch=args.refiner_start, aesthetic_score=args.aesthetic_score,
                          negative_aesthetic_score=args.negative_aesthetic_score, **kw)  # fmt: skip
    finally:
        refiner.on_step = None
    return images, None, {"infotext": infotext(args)}


def check_loaded(pipe, refiner, args, model) -> None:
    """The loaded pair (a Hub id or a pickle could not be checked from its files), before sampling."""
    try:
        R.check_pair(pipe, refiner, str(model), str(args.refiner))
    except R.RefinerError as e:
        raise UsageError(f"--refiner: {e}") from None
