"""sample.py's generation parameters as A1111 infotext (:mod:`sd_jax.infotext`): what each written image records,
and ``--from-image IMG``, which reads them back into the flags.

Standard A1111 keys carry what A1111 has (``Steps``, ``Sampler``, ``Schedule type``, ``CFG scale``, ``Seed``,
``Size``, ``Model hash``, ``Model``, ``Denoising strength``, ``Clip skip``, ``Hires ...``, ``Lora hashes``,
``TI hashes``, ``ControlNet N``, ``Variation seed``/``Variation seed strength``, ``Batch size``/``Batch pos``,
``Version``); sd-jax's own keys add what reproducing an image here needs and A1111 lacks: ``Mode`` (inpaint,
denoise, upscale, interpolate), ``Guidance rescale``, ``Lora weights``, ``Noise level``, ``Denoise level``,
``Interpolate prompt``, ``Frames``, ``Frame``, ``Dtype``, ``Micro batch``.

A batch shares one seed (the pipeline draws the whole batch's noise from it: ``sd_jax.pipelines.modes._keys``),
so an image of a batch is reproduced from ``Seed``, ``Batch size`` and its ``Batch pos``: ``--from-image``
samples that batch again and writes only that image. Interpolation frames record the two seeds and their slerp
fraction (``Seed``, ``Variation seed``, ``Variation seed strength``: A1111's variation-seed noise is the same
slerp), the second prompt, the frame count and the frame's index.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import pathlib
import sys

from sd_jax import hashing
from sd_jax import infotext as it
from sd_jax.cli.sample_args import UsageError, lora_arg
from sd_jax.pipelines import masked_content as MC

SPECIAL_MODES = ("inpaint", "denoise", "upscale", "interpolate")  # recorded as Mode; txt2img/img2img are implied


def version() -> str:
    try:
        return f"sd-jax {importlib.metadata.version('sd-jax')}"
    except importlib.metadata.PackageNotFoundError:
        return "sd-jax"


def _embedding_token(spec: str) -> tuple[str, str]:
    """(path, token) of ``--embedding PATH[:TOKEN]`` (the token defaults to the file's stem)."""
    if pathlib.Path(spec).exists():
        return spec, pathlib.Path(spec).stem
    path, _, token = spec.rpartition(":")
    return path, token


def _controlnet(i: int, path: str, scale: float, control) -> tuple[str, str]:
    """sd-webui-controlnet's unit text (``ControlNet 0: "Module: none, Model: name [hash], Weight: 1, ..."``)."""
    name = hashing.model_name(path).replace(",", "").replace(":", "")
    h = hashing.short_hash8(path)
    values = {"Module": "canny" if control.canny else "none", "Model": f"{name} [{h}]" if h else name,
              "Weight": float(scale), "Resize Mode": "Just Resize", "Guidance Start": float(control.start),
              "Guidance End": float(control.end), "Pixel Perfect": False,
              "Control Mode": "ControlNet is more important" if control.guess_mode else "Balanced"}  # fmt: skip
    if control.canny:
        values.update({"Threshold A": 100.0, "Threshold B": 200.0})
    return f"ControlNet {i}", ", ".join(f"{k}: {v}" for k, v in values.items())  # str(): Python's, as the extension


def shared_fields(args, *, mode: str, sampler: str, plan, model: str, loras, control) -> dict:
    """The infotext keys every image of the run shares (prompt, seed and batch position are per image)."""
    f = {"Steps": args.steps, "Sampler": it.sampler_to_a1111(sampler),
         "Schedule type": it.schedule_to_a1111(args.schedule, sampler), "CFG scale": args.guidance_scale,
         "Size": f"{plan.width}x{plan.height}", "Model hash": hashing.model_hash(model),
         "Model": hashing.model_name(model)}  # fmt: skip
    if mode == "img2img":
        f["Denoising strength"] = args.strength
    if args.clip_skip:
        f["Clip skip"] = args.clip_skip + 1  # A1111 counts the last layer as 1; diffusers' clip_skip=1 is its 2
    if args.guidance_rescale:
        f["Guidance rescale"] = args.guidance_rescale
    if loras:
        f["Lora hashes"] = it.format_hashes((pathlib.Path(p).stem, hashing.lora_hash(p)) for p, _ in loras)
        f["Lora weights"] = ", ".join(f"{pathlib.Path(p).stem.replace(',', '')}: {s!r}" for p, s in loras)
    if args.embedding:
        pairs = [(tok, hashing.embedding_hash(p)) for p, tok in map(_embedding_token, args.embedding)]
        f["TI hashes"] = it.format_hashes(pairs)
    if control is not None:
        f.update(_controlnet(i, p, s, control) for i, (p, s) in enumerate(control.nets))
    if args.ip_adapter:
        f["IP-Adapter"] = f"{hashing.model_name(args.ip_adapter)} [{hashing.short_hash8(args.ip_adapter)}]"
        f["IP-Adapter scale"] = args.ip_scale
    if mode in SPECIAL_MODES:
        f["Mode"] = mode
    if mode == "upscale":
        f["Noise level"] = args.noise_level
    if mode == "inpaint" and args.masked_content != "original":
        f["Masked content"] = MC.LABELS[args.masked_content]
    if args.dtype != "float32":
        f["Dtype"] = args.dtype
    if args.micro_batch and mode == "txt2img":
        f["Micro batch"] = args.micro_batch
    if getattr(args, "emphasis", None) not in (None, "a1111"):
        f["Emphasis"] = args.emphasis
    f["Version"] = version()
    return f


def image_fields(shared: dict, seed: int, batch_size: int, pos: int, extra: dict | None = None) -> dict:
    """One image's keys: the shared ones, its seed, its place in the batch, and what its mode reported."""
    f = {**shared, "Seed": seed}
    if batch_size > 1:
        f.update({"Batch size": batch_size, "Batch pos": pos})
    extra = extra or {}
    if "noise_level" in extra:  # denoise: the estimated latent noise level
        f["Denoise level"] = float(extra["noise_level"])
    f.update(extra.get("infotext", {}))
    return f


def frame_fields(shared: dict, seed_a: int, seed_b: int, prompt_b: str | None, frames: int, k: int) -> dict:
    """An interpolation frame: noise slerped ``k / (frames - 1)`` of the way from seed A's to seed B's."""
    import numpy as np

    t = float(np.linspace(0.0, 1.0, frames)[k])
    return {**shared, "Seed": seed_a, "Variation seed": seed_b, "Variation seed strength": t,
            "Interpolate prompt": prompt_b or None, "Frames": frames, "Frame": k}  # fmt: skip


# -- --from-image --


@dataclasses.dataclass
class FromImage:
    path: str
    fields: dict
    keep: int | None = None  # the image of the batch (or the frame) to write


def explicit_dests(parser, argv) -> set[str]:
    """The destinations the command line sets itself (so they win over the image's values)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(argv)
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]
    return set(vars(ns))


def _number(fields, key, kind, path):
    try:
        return kind(fields[key])
    except ValueError:
        raise UsageError(f"--from-image {path}: {key}: {fields[key]!r} is not a number") from None


def read_image(path: str) -> dict:
    from PIL import UnidentifiedImageError

    from sd_jax.pnginfo import read_parameters

    if not pathlib.Path(path).is_file():
        raise UsageError(f"--from-image {path}: no such file")
    try:
        text = read_parameters(path)
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"--from-image {path}: not a readable image ({str(e).splitlines()[0]})") from None
    if text is None:
        raise UsageError(f"--from-image {path}: the image carries no generation parameters ; give one written by "
                         "sd-jax or A1111 (python -m sd_jax.pnginfo IMG shows them)")  # fmt: skip
    fields = it.parse_infotext(text)
    if "Steps" not in fields:
        raise UsageError(f"--from-image {path}: its parameters have no 'Steps:' line ; not an A1111 infotext")
    return fields


def apply_image(args, parser, argv) -> FromImage:
    """Set every flag the command line leaves alone from ``--from-image``'s infotext; returns what the run needs
    later (the fields, for the model-hash check, and which image of the batch to keep)."""
    path = args.from_image
    f = read_image(path)
    given = explicit_dests(parser, argv)
    if "prompts_file" in given:  # the file's prompts replace the image's, as --prompt would
        given.add("prompt")
    values: dict = {"prompt": [f["Prompt"]], "negative_prompt": f["Negative prompt"] or None}
    try:
        if "Sampler" in f:
            values["sampler"], implied = it.sampler_from_a1111(f["Sampler"])
            values["schedule"] = it.schedule_from_a1111(f["Schedule type"]) if "Schedule type" in f else (
                implied or "default")  # fmt: skip
    except it.InfotextError as e:
        raise UsageError(f"--from-image {path}: {e}") from None
    values["steps"] = _number(f, "Steps", int, path)
    numbers = (("CFG scale", "guidance_scale", float), ("Seed", "seed", int), ("Micro batch", "micro_batch", int),
               ("Guidance rescale", "guidance_rescale", float), ("Noise level", "noise_level", int),
               ("Denoise level", "denoise_level", float))  # fmt: skip
    for key, dest, kind in numbers:
        if key in f:
            values[dest] = _number(f, key, kind, path)
    if "Clip skip" in f:
        n = _number(f, "Clip skip", int, path)
        values["clip_skip"] = n - 1 if n > 1 else None
    if "Dtype" in f:
        values["dtype"] = f["Dtype"]
    mode = f.get("Mode", "img2img" if "Denoising strength" in f and not _hires(f) else "txt2img")
    size = it.size(f)
    if size and mode != "upscale":
        values["width"], values["height"] = size
    if "Denoising strength" in f and not _hires(f):
        values["strength"] = _number(f, "Denoising strength", float, path)
    values.update(_hires_values(f, path))
    if mode == "denoise":
        values["denoise"] = True
    elif mode == "upscale":
        values["upscale"] = True
    keep = None
    if mode == "interpolate":
        values["interpolate"] = f.get("Interpolate prompt", "")
        values["frames"] = _number(f, "Frames", int, path) if "Frames" in f else 1
        keep = _number(f, "Frame", int, path) if "Frame" in f else None
    elif "Batch size" in f:
        n = _number(f, "Batch size", int, path)
        values.update(batch_size=n, num_images=n)
        keep = _number(f, "Batch pos", int, path) if "Batch pos" in f else 0
        if "batch_size" in given or "num_images" in given or not 0 <= keep < n:
            keep = None
    if "emphasis" in vars(args) and "Emphasis" in f:
        emphasis = {"original": "a1111", "a1111": "a1111", "comfy": "comfy", "none": "none"}.get(f["Emphasis"].lower())
        if emphasis is None:
            print(f"warning: --from-image {path}: Emphasis {f['Emphasis']!r} has no sd-jax equivalent ; using "
                  "--emphasis as given", file=sys.stderr)  # fmt: skip
        else:
            values["emphasis"] = emphasis
    if "Masked content" in f:
        content = {v: k for k, v in MC.LABELS.items()}.get(f["Masked content"], "original")
        values["masked_content"] = content
    if "Refiner switch at" in f and getattr(args, "refiner", None):  # the refiner itself: --refiner PATH
        values["refiner_start"] = _number(f, "Refiner switch at", float, path)
    for dest, value in values.items():
        if dest not in given and dest in vars(args):
            setattr(args, dest, value)
    _needs(args, f, mode, given, path)
    return FromImage(path, f, keep)


def _hires(f: dict) -> bool:
    return "Hires upscale" in f or "Hires resize" in f


def _hires_values(f: dict, path) -> dict:
    if not _hires(f):
        return {}
    out = {"hires_denoise": _number(f, "Denoising strength", float, path) if "Denoising strength" in f else None}
    if "Hires upscale" in f:
        out["hires_scale"] = _number(f, "Hires upscale", float, path)
    else:
        w, _, h = f["Hires resize"].partition("x")
        out["hires_width"], out["hires_height"] = (int(w) or None), (int(h) or None)
    if "Hires steps" in f:
        out["hires_steps"] = _number(f, "Hires steps", int, path)
    if "Hires upscaler" in f:
        from sd_jax.pipelines.hires import UPSCALERS

        names = {u.name.lower(): cli for cli, u in UPSCALERS.items()}
        out["hires_upscaler"] = names.get(f["Hires upscaler"].lower(), f["Hires upscaler"])
    return {k: v for k, v in out.items() if v is not None}


def _needs(args, f: dict, mode: str, given: set, path) -> None:
    """Inputs the infotext names but cannot carry: the init image, mask, LoRAs, embeddings, ControlNets."""
    if mode in ("img2img", "inpaint", "denoise", "upscale") and not args.init_image:
        raise UsageError(f"--from-image {path}: the image was made by {mode} from an input image ; give it with "
                         "--init-image" + (" and --mask-image" if mode == "inpaint" else ""))  # fmt: skip
    if mode == "inpaint" and not args.mask_image:
        raise UsageError(f"--from-image {path}: the image was made by inpainting ; give --mask-image too")
    missing = [(k, flag) for k, flag in (("Lora hashes", "lora"), ("TI hashes", "embedding"), ("Refiner", "refiner"))
               if k in f and not getattr(args, flag, None)]  # fmt: skip
    if any(k.startswith("ControlNet ") for k in f) and not args.control_image:
        missing.append(("ControlNet 0", "control_image"))
    if "Lora hashes" in f and args.lora:
        want = set(it.parse_hashes(f["Lora hashes"]).values())
        for spec in args.lora:
            lora = lora_arg(spec)[0]
            if hashing.lora_hash(lora) not in want:
                print(f"warning: --lora {lora} (hash {hashing.lora_hash(lora)}) is none of the LoRAs --from-image "
                      f"{path} names ({f['Lora hashes']})", file=sys.stderr)  # fmt: skip
    for key, flag in missing:
        print(f"warning: --from-image {path} used {key.split()[0]} ({f[key]}) ; pass --{flag.replace('_', '-')} "
              "to use them too", file=sys.stderr)  # fmt: skip


def check_model(source: FromImage, model: str) -> None:
    """A warning naming both hashes when the image was made with another model; the run goes on."""
    want = source.fields.get("Model hash")
    have = hashing.model_hash(model)
    if want and have and want.lower() != have.lower():
        name = source.fields.get("Model", "?")
        print(f"warning: --from-image {source.path} was made with model hash {want} ({name}); this model "
              f"({hashing.model_name(model)}) hashes to {have} ; the image will differ", file=sys.stderr)  # fmt: skip
