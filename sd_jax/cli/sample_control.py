"""sample.py's ControlNet request (its flags are in :mod:`sd_jax.cli.sample_args`): ``--controlnet PATH[:SCALE]``
and ``--control-image IMG`` (both repeatable, matched in order), ``--control-start``/``--control-end`` (fractions
of the steps), ``--guess-mode`` and ``--canny`` (run the edge detector on the control images first).

Without ``--controlnet`` and ``--model``, ``--control-image`` uses the ControlNet shipped with the embedded model
(:func:`sd_jax.embedded.default_controlnet_path`). Every check here runs before any model loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

from sd_jax.cli.sample_args import UsageError


@dataclasses.dataclass(frozen=True)
class Control:
    nets: tuple[tuple[str, float], ...]  # (path, scale) per net
    images: tuple[str, ...]
    start: float
    end: float
    guess_mode: bool
    canny: bool

    def meta(self) -> dict:
        """What the PNG metadata records."""
        nets = [{"path": p, "scale": s, "control_image": i} for (p, s), i in zip(self.nets, self.images)]
        return {"controlnet": nets, "control_start": self.start, "control_end": self.end,
                "guess_mode": self.guess_mode, "canny": self.canny}  # fmt: skip


def _is_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.exists(text)


def controlnet_arg(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE``: an existing path wins, so paths may contain colons."""
    path, sep, scale = spec.rpartition(":")
    if os.path.exists(spec) or not sep:
        path, value = spec, 1.0
    else:
        try:
            value = float(scale)
        except ValueError:
            raise UsageError(f"--controlnet {spec}: scale {scale!r} is not a number ; write PATH:SCALE, e.g. "
                             f"{path}:0.8") from None  # fmt: skip
        if not math.isfinite(value):
            raise UsageError(f"--controlnet {spec}: scale {scale!r} is not a finite number ; use e.g. {path}:0.8")
    p = pathlib.Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UsageError(f"--controlnet {path}: a folder without config.json ; pass a diffusers ControlNet folder")
    if not p.exists() and not _is_hub_id(path):
        raise UsageError(f"--controlnet {path}: no such file or folder ; pass a ControlNet folder, file or Hub id")
    return path, value


def _check_image(path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not pathlib.Path(path).is_file():
        raise UsageError(f"--control-image {path}: no such file")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UsageError(f"--control-image {path}: not a readable image ({str(e).splitlines()[0]})") from None


def check(args, embedded_model: bool) -> Control | None:
    """The ControlNet request of ``args`` (None without one), checked; ``embedded_model``: no --model given."""
    given = [f for f, on in (("--controlnet", args.controlnet), ("--guess-mode", args.guess_mode),
                             ("--canny", args.canny), ("--control-start", args.control_start != 0.0),
                             ("--control-end", args.control_end != 1.0)) if on]  # fmt: skip
    if not args.control_image:
        if given:
            raise UsageError(f"{given[0]} needs --control-image ; give the control map (one per --controlnet)")
        return None
    other = [f for f, on in (("--upscale", args.upscale), ("--denoise", args.denoise),
                             ("--interpolate", args.interpolate is not None)) if on]  # fmt: skip
    if other:
        raise UsageError(f"--control-image works with txt2img, img2img and inpaint, not {other[0]} ; drop one")
    nets = [controlnet_arg(s) for s in args.controlnet]
    if not nets:
        from sd_jax.embedded import default_controlnet_path

        if not embedded_model:
            raise UsageError("--control-image needs --controlnet PATH[:SCALE] for --model ; the embedded ControlNet "
                             "goes with the embedded model only")  # fmt: skip
        default = default_controlnet_path()
        if default is None:
            raise UsageError("no embedded ControlNet ships with this version ; pass --controlnet PATH[:SCALE]")
        if len(args.control_image) != 1:
            raise UsageError(f"the embedded ControlNet takes one --control-image, got {len(args.control_image)} ; "
                             "pass --controlnet PATH for each")  # fmt: skip
        nets = [(str(default), 1.0)]
    if len(nets) != len(args.control_image):
        raise UsageError(f"{len(args.controlnet)} --controlnet but {len(args.control_image)} --control-image ; give "
                         "one control image per ControlNet, matched in order")  # fmt: skip
    for path in args.control_image:
        _check_image(path)
    if args.control_start >= args.control_end:
        raise UsageError(f"--control-start {args.control_start} must be below --control-end {args.control_end}")
    return Control(tuple(nets), tuple(args.control_image), args.control_start, args.control_end, args.guess_mode,
                   args.canny)  # fmt: skip


def default_size(control: Control, multiple: int) -> tuple[int, int]:
    """txt2img without --height/--width: the first control image's (height, width), down to ``multiple``."""
    from PIL import Image

    with Image.open(control.images[0]) as im:
        w, h = im.size
    return max(h - h % multiple, multiple), max(w - w % multiple, multiple)


def images(control: Control) -> list:
    """The control maps as the pipeline takes them (canny edges with --canny)."""
    from sd_jax.control_image import canny, load_control_image

    maps = [load_control_image(p) for p in control.images]
    return [canny(m) for m in maps] if control.canny else maps


def mode_kwargs(control: Control | None, maps: list | None) -> dict:
    """The txt2img/img2img/inpaint arguments of the request."""
    if control is None:
        return {}
    return {"control_image": maps, "controlnet_conditioning_scale": [s for _, s in control.nets],
            "control_guidance_start": control.start, "control_guidance_end": control.end,
            "guess_mode": control.guess_mode}  # fmt: skip
