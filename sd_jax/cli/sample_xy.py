"""sample.py's X/Y grids (A1111's "X/Y/Z plot" script, two axes): ``--xy "steps=10,20,40" --xy "guidance=3,7,11"``.

Axes: ``steps``, ``guidance`` (alias ``cfg``), ``sampler`` (sd-jax or A1111 names), ``schedule``, ``seed``,
``strength`` (img2img) and ``prompt``, A1111's Prompt S/R: the first value must occur in the prompt (or the
negative prompt) and each value replaces every occurrence of it. Values are comma-separated (CSV quoting, as
A1111); numeric axes take A1111's ranges: ``1-5`` (step 1), ``10-30 (+10)``, ``3-11 [5]`` (5 evenly spaced).

Every cell is one image through the same sampling call as a plain run (``sample.sample_batch``), saved with its
own infotext; the pipeline caches its jitted loop per static configuration (sampler, steps, schedule), so cells
that differ only in guidance, seed or prompt reuse one compile and the model is loaded once. The labelled grid
(``NNNNN-xy_grid.png``) carries the first cell's parameters plus A1111's ``X Type``/``X Values``/``Y Type``/
``Y Values``. Every check runs before any model loads.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import re

import numpy as np

from sd_jax import infotext as it
from sd_jax.cli.sample_args import MAX_SEED, MAX_STEPS, UsageError
from sd_jax.sampling.registry import SAMPLERS, SCHEDULE_TYPES

# axis -> (args attribute, A1111's axis label)
AXES = {"steps": ("steps", "Steps"), "guidance": ("guidance_scale", "CFG Scale"),
        "cfg": ("guidance_scale", "CFG Scale"), "sampler": ("sampler", "Sampler"),
        "schedule": ("schedule", "Schedule type"), "seed": ("seed", "Seed"), "strength": ("strength", "Denoising"),
        "prompt": ("prompt", "Prompt S/R")}  # fmt: skip
_INT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*$")
_INT_N = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)\s*\[(\d+)\s*\]\s*$")
_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*$")
_FLOAT_N = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)\s*\[(\d+(?:\.\d*)?)\s*\]\s*$")


@dataclasses.dataclass(frozen=True)
class Axis:
    name: str  # as given (steps, guidance, ...)
    dest: str  # the args attribute each value sets
    label: str  # A1111's axis label
    values: tuple  # typed values, in order
    text: str  # the values as given

    def caption(self, value) -> str:
        if self.dest == "prompt":
            return str(value)
        if self.dest == "sampler":
            return it.sampler_to_a1111(value)
        if self.dest == "schedule":
            return it.schedule_to_a1111(value)
        return f"{self.label}: {it.format_value(value)}"


def _split(text: str) -> list[str]:
    return [v.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for v in row if v.strip()]


def _numbers(flag: str, items: list[str], kind) -> list:
    out = []
    ranged, counted = (_INT, _INT_N) if kind is int else (_FLOAT, _FLOAT_N)
    for item in items:
        m, n = ranged.fullmatch(item), counted.fullmatch(item)
        try:
            bounds = [kind(g.replace(" ", "")) for g in (m or n).groups()[:2]] if (m or n) else None
            value = kind(item) if bounds is None else None
            step = kind(m.group(3)) if m and m.group(3) else None
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise UsageError(f"{flag}: {item!r} is not a {what} or a range (10-30 (+10), 3-11 [5])") from None
        if bounds is None:
            out.append(value)
        elif n:
            out += [kind(v) for v in np.linspace(*bounds, int(float(n.group(3)))).tolist()]
        else:
            a, b = bounds
            step = step if step is not None else (1 if b >= a else -1)
            if step == 0 or (b - a) * step < 0:
                raise UsageError(f"{flag}: range {item!r} never reaches its end ; e.g. 10-30 (+10)")
            count = int(np.floor((b - a) / step + 1e-9)) + 1
            out += [kind(a + i * step) for i in range(count)]
    return out


def _sampler(flag: str, value: str) -> str:
    if value in SAMPLERS:
        return value
    try:
        ours, implied = it.sampler_from_a1111(value)
    except it.InfotextError as e:
        raise UsageError(f"{flag}: {e}") from None
    alias = f"{ours}_{implied}"
    if implied and alias not in SAMPLERS:
        raise UsageError(f"{flag}: {value!r} folds in schedule {implied} ; give the sampler and a schedule axis")
    return alias if implied else ours


def _schedule(flag: str, value: str) -> str:
    if value in SCHEDULE_TYPES:
        return value
    try:
        return it.schedule_from_a1111(value)
    except it.InfotextError as e:
        raise UsageError(f"{flag}: {e}") from None


def parse_axis(spec: str) -> Axis:
    """``NAME=V1,V2,...`` -> an :class:`Axis` with checked, typed values."""
    name, sep, text = spec.partition("=")
    name = name.strip().lower()
    flag = f"--xy {spec!r}"
    if not sep or name not in AXES:
        raise UsageError(f"{flag}: write AXIS=V1,V2,... with AXIS one of {', '.join(AXES)}")
    items = _split(text)
    if not items:
        raise UsageError(f"{flag}: no values ; e.g. --xy {name}=" + {"steps": "10,20", "prompt": "cat,dog"}.get(
            name, "1,2"))  # fmt: skip
    dest, label = AXES[name]
    if dest == "steps":
        values = _numbers(flag, items, int)
        if bad := [v for v in values if not 1 <= v <= MAX_STEPS]:
            raise UsageError(f"{flag}: steps {bad[0]} outside [1, {MAX_STEPS}]")
    elif dest == "seed":
        values = _numbers(flag, items, int)
        if bad := [v for v in values if not 0 <= v <= MAX_SEED]:
            raise UsageError(f"{flag}: seed {bad[0]} outside [0, {MAX_SEED}]")
    elif dest in ("guidance_scale", "strength"):
        values = _numbers(flag, items, float)
        if dest == "strength" and (bad := [v for v in values if not 0.0 <= v <= 1.0]):
            raise UsageError(f"{flag}: strength {bad[0]} outside [0, 1]")
        if bad := [v for v in values if not np.isfinite(v)]:
            raise UsageError(f"{flag}: {bad[0]} is not a finite number")
    elif dest == "sampler":
        values = [_sampler(flag, v) for v in items]
    elif dest == "schedule":
        values = [_schedule(flag, v) for v in items]
    else:
        values = items
    return Axis(name, dest, label, tuple(values), text)


def check(args) -> list[Axis] | None:
    """The ``--xy`` axes of ``args`` (None without any), checked against the other flags."""
    if not args.xy:
        return None
    if len(args.xy) > 2:
        raise UsageError(f"--xy given {len(args.xy)} times ; an X/Y grid has one or two axes")
    axes = [parse_axis(s) for s in args.xy]
    if len(axes) == 2 and axes[0].dest == axes[1].dest:
        raise UsageError(f"--xy {axes[0].name} and --xy {axes[1].name} set the same thing ; give two different axes")
    other = [f for f, on in (("--interpolate", args.interpolate is not None), ("--save-steps", args.save_steps),
                             ("--num-images", args.num_images > 1)) if on]  # fmt: skip
    if other:
        raise UsageError(f"--xy draws one image per cell ; drop {other[0]}")
    if args.prompts_file or len(args.prompt or []) != 1:
        raise UsageError("--xy takes one --prompt (the grid's cells vary it with --xy prompt=...) ; give just one")
    if any(a.dest == "strength" for a in axes) and (not args.init_image or args.mask_image or args.denoise
                                                    or args.upscale):  # fmt: skip
        raise UsageError("--xy strength=... varies img2img's --strength ; give --init-image (without --mask-image, "
                         "--denoise or --upscale)")  # fmt: skip
    return axes


def check_prompt(axes: list[Axis], prompt: str, negative: str | None) -> None:
    for a in axes:
        if a.dest == "prompt" and a.values[0] not in prompt and a.values[0] not in (negative or ""):
            raise UsageError(f"--xy prompt=...: the first value {a.values[0]!r} occurs in neither the prompt "
                             f"{prompt!r} nor the negative prompt ; Prompt S/R replaces it")  # fmt: skip


def _cell(args, axes, values):
    cell = copy.copy(args)
    prompt, negative = args.prompt[0], args.negative_prompt
    for a, v in zip(axes, values):
        if a.dest == "prompt":
            prompt = prompt.replace(a.values[0], v)
            negative = negative.replace(a.values[0], v) if negative else negative
        else:
            setattr(cell, a.dest, v)
    cell.negative_prompt = negative
    return cell, prompt


def _fields(shared: dict, cell, sampler: str, mode: str) -> dict:
    f = {**shared, "Steps": cell.steps, "Sampler": it.sampler_to_a1111(sampler),
         "Schedule type": it.schedule_to_a1111(cell.schedule, sampler), "CFG scale": cell.guidance_scale}  # fmt: skip
    if mode == "img2img":
        f["Denoising strength"] = cell.strength
    return f


def run_grid(pipe, args, axes, mode, prompt, plan, inputs, shared, writer, sample_batch):
    """Sample every cell (rows: the second axis) and write the cells and the labelled grid; returns its path."""
    from sd_jax.cli import sample_params

    xs, ys = axes[0], axes[1] if len(axes) > 1 else None
    rows = []
    first_text = None
    for yv in ys.values if ys else (None,):
        row = []
        for xv in xs.values:
            chosen = (xv,) if ys is None else (xv, yv)
            cell, cell_prompt = _cell(args, axes, chosen)
            sampler = cell.sampler or pipe.default_sampler
            imgs, _, extra = sample_batch(pipe, cell, mode, [cell_prompt], cell.seed, plan, inputs)
            fields = sample_params.image_fields(_fields(shared, cell, sampler, mode), cell.seed, 1, 0, extra)
            text = it.format_infotext(cell_prompt, cell.negative_prompt, fields)
            first_text = first_text or (cell_prompt, cell.negative_prompt, fields)
            writer.add(imgs[:1], [text], [cell.seed])
            row.append(np.asarray(imgs[0]))
        rows.append(row)
    col_labels = [xs.caption(v) for v in xs.values]
    row_labels = [ys.caption(v) for v in ys.values] if ys else None
    grid = draw_grid(rows, col_labels, row_labels)
    prompt0, negative0, fields0 = first_text
    meta = {**fields0, "Script": "X/Y/Z plot", "X Type": xs.label, "X Values": xs.text}
    if ys:
        meta.update({"Y Type": ys.label, "Y Values": ys.text})
    return writer.save_image(grid, "xy_grid", it.format_infotext(prompt0, negative0, meta))


def draw_grid(rows, col_labels, row_labels=None) -> np.ndarray:
    """Cells ``rows[r][c]`` ([H, W, 3] in [0, 1]) tiled on white, column labels above, row labels to the left."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = rows[0][0].shape[:2]
    try:
        font = ImageFont.load_default(size=max(10, min(h, w) // 12))
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def extent(text):
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    pad = 4
    top = max(extent(t)[1] for t in col_labels) + 2 * pad
    left = max(extent(t)[0] for t in row_labels) + 2 * pad if row_labels else 0
    canvas = Image.new("RGB", (left + w * len(col_labels), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            cell = Image.fromarray(np.clip(np.round(np.asarray(img) * 255), 0, 255).astype(np.uint8))
            canvas.paste(cell, (left + c * w, top + r * h))
    for c, text in enumerate(col_labels):
        tw, _ = extent(text)
        draw.text((left + c * w + max((w - tw) // 2, 0), pad), text, fill="black", font=font)
    for r, text in enumerate(row_labels or []):
        _, th = extent(text)
        draw.text((pad, top + r * h + max((h - th) // 2, 0)), text, fill="black", font=font)
    return np.asarray(canvas, np.float32) / 255.0
