"""Evaluate a shapes ControlNet: does the shape go where the control says, in the prompt's colours?

python -m sd_jax.evaluation.controlnet_eval                   # the embedded pair
python -m sd_jax.evaluation.controlnet_eval --model DIR --controlnet DIR --out docs/controlnet_eval

Every one of the 168 combinations gets 2 control images (the combination's shape as a white silhouette on black,
at two random sizes and places) x ``--seeds`` seeds, sampled with the prompt ``a {color} {shape} on a {background}
background``. For each image:

- IoU between the generated shape's region (:func:`sd_jax.evaluation.oracle.region`) and the control's;
- the oracle's colour and background against the prompt's (joint accuracy);
- the oracle's shape against the control's.

Then each combination once more with a control of *another* shape: which wins, the control or the prompt's word.
Writes ``results.json``, ``results.md`` and ``grid.png`` (control | output pairs) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from sd_jax.data import shapes
from sd_jax.evaluation.oracle import classify_batch, region
from sd_jax.evaluation.shapes_eval import generate_prompts

IOU_TARGET = 0.85


def control_image(shape: str, combo_index: int, j: int) -> np.ndarray:
    """float32 ``[64, 64, 3]`` in [0, 1]: a white ``shape`` on black, placed by (combination, j)."""
    rng = np.random.default_rng([100, combo_index, j])
    size = rng.uniform(*shapes.SIZE_RANGE) * shapes.IMAGE_SIZE
    x, y = rng.uniform(0, shapes.IMAGE_SIZE - size, size=2)
    return shapes.draw(shape, "white", "black", size, x, y).astype(np.float32) / 255.0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def generate(pipe, prompts, controls, seed: int, **kw):
    """uint8 images; the noise of prompt ``i`` depends on (seed, i) only."""
    return generate_prompts(pipe, prompts, seed, per_item={"control_image": controls}, size=controls.shape[1], **kw)


def evaluate(pipe, *, seeds=2, controls_per_combo=2, combos=None, log=print, **kw) -> tuple[dict, dict]:
    combos = list(combos or shapes.ALL_COMBINATIONS)
    rows = [(i, j) for i in range(len(combos)) for j in range(controls_per_combo)]
    prompts = [shapes.caption(*combos[i]) for i, _ in rows]
    controls = np.stack([control_image(combos[i][0], i, j) for i, j in rows])
    want = np.asarray([(shapes.SHAPES.index(s), shapes.COLORS.index(c), shapes.COLORS.index(b))
                       for s, c, b in (combos[i] for i, _ in rows)])  # fmt: skip
    ious, joint, shape_ok, images = [], [], [], []
    for seed in range(seeds):
        imgs = generate(pipe, prompts, controls, seed, **kw)
        pred = classify_batch(imgs)
        ious += [iou(region(im), c[..., 0] > 0.5) for im, c in zip(imgs, controls)]
        joint += list((pred[:, 1] == want[:, 1]) & (pred[:, 2] == want[:, 2]))
        shape_ok += list(pred[:, 0] == want[:, 0])
        images.append(imgs)
        log(f"seed {seed}: mean IoU {np.mean(ious):.3f}, colour+background {np.mean(joint):.3f}")
    ious = np.asarray(ious)
    res = {"n": len(ious), "iou_mean": float(ious.mean()), "iou_median": float(np.median(ious)),
           f"iou_ge_{IOU_TARGET}": float((ious >= IOU_TARGET).mean()),
           "color_background_joint": float(np.mean(joint)),
           "shape_follows_control": float(np.mean(shape_ok))}  # fmt: skip
    # the control's shape against the prompt's word: each combination once, with the next shape as control
    other = [shapes.SHAPES[(shapes.SHAPES.index(s) + 1) % 3] for s, _, _ in combos]
    ctl = np.stack([control_image(o, i, 99) for i, o in enumerate(other)])
    imgs = generate(pipe, [shapes.caption(*c) for c in combos], ctl, 0, **kw)
    pred = classify_batch(imgs)[:, 0]
    res["conflict"] = {
        "n": len(combos),
        "control_wins": float(np.mean(pred == np.asarray([shapes.SHAPES.index(o) for o in other]))),
        "prompt_wins": float(np.mean(pred == np.asarray([shapes.SHAPES.index(c[0]) for c in combos]))),
        "iou_mean": float(np.mean([iou(region(im), c[..., 0] > 0.5) for im, c in zip(imgs, ctl)])),
    }
    res["conflict"]["neither"] = 1.0 - res["conflict"]["control_wins"] - res["conflict"]["prompt_wins"]
    return res, {"controls": controls, "images": np.stack(images), "rows": rows, "combos": combos}


def grid(controls: np.ndarray, images: np.ndarray, picks, cols: int = 4) -> np.ndarray:
    """(control | output) pairs, ``cols`` pairs a row, 2 px gaps."""
    pairs = [np.concatenate([(controls[k] * 255).astype(np.uint8), images[k]], axis=1) for k in picks]
    h, w, _ = pairs[0].shape
    rows = -(-len(pairs) // cols)
    out = np.full((rows * (h + 2), cols * (w + 4), 3), 255, np.uint8)
    for n, p in enumerate(pairs):
        r, c = divmod(n, cols)
        out[r * (h + 2) : r * (h + 2) + h, c * (w + 4) : c * (w + 4) + w] = p
    return out


def markdown(res: dict) -> str:
    c = res["conflict"]
    return "\n".join([
        f"Model `{res['model']}` + ControlNet `{res['controlnet']}`, {res['steps']} {res['sampler']} steps, CFG "
        f"{res['guidance_scale']}: 168 combinations x 2 control images x {res['seeds']} seeds ({res['n']} images).",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| images with IoU(shape, control) >= {IOU_TARGET} | {res[f'iou_ge_{IOU_TARGET}']:.1%} | >= 90% |",
        f"| mean / median IoU | {res['iou_mean']:.3f} / {res['iou_median']:.3f} | |",
        f"| colour and background both right (oracle) | {res['color_background_joint']:.1%} | >= 95% |",
        f"| shape class = the control's | {res['shape_follows_control']:.1%} | |",
        f"| control of another shape: the control's shape wins | {c['control_wins']:.1%} (prompt's word "
        f"{c['prompt_wins']:.1%}, neither {c['neither']:.1%}; {c['n']} images, mean IoU {c['iou_mean']:.3f}) | |",
        "",
    ])  # fmt: skip


def run(model=None, controlnet=None, seeds=2, steps=20, sampler="euler", guidance_scale=7.5, out=None, log=print):
    from sd_jax.embedded import default_controlnet_path, default_model_path
    from sd_jax.pipelines.pipeline import StableDiffusion

    model, controlnet = model or default_model_path(), controlnet or default_controlnet_path()
    if controlnet is None:
        raise SystemExit("no ControlNet: pass --controlnet DIR (none ships with this version)")
    pipe = StableDiffusion.load(model)
    pipe.load_controlnet(controlnet)
    t0 = time.time()
    res, data = evaluate(pipe, seeds=seeds, steps=steps, sampler=sampler, guidance_scale=guidance_scale, log=log)
    res.update(model=pathlib.Path(model).name, controlnet=pathlib.Path(controlnet).name, seeds=seeds, steps=steps,
               sampler=sampler, guidance_scale=guidance_scale, seconds=time.time() - t0)  # fmt: skip
    log(markdown(res))
    if out:
        from PIL import Image

        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "results.md").write_text(markdown(res))
        picks = list(range(0, len(data["rows"]), len(data["rows"]) // 12))[:12]
        Image.fromarray(grid(data["controls"], data["images"][0], picks)).save(out / "grid.png")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="base model folder (default: the embedded model)")
    p.add_argument("--controlnet", help="ControlNet folder (default: the embedded shapes ControlNet)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--out", help="folder for results.json, results.md and grid.png")
    a = p.parse_args(argv)
    run(a.model, a.controlnet, a.seeds, a.steps, a.sampler, a.guidance_scale, a.out)


if __name__ == "__main__":
    main()
