"""Evaluate a text-to-image model on "shapes": prompt adherence, VAE reconstruction and U-Net denoising.

python -m sd_jax.evaluation.shapes_eval                       # the embedded default model
python -m sd_jax.evaluation.shapes_eval --model DIR --seeds 4 --out docs/eval

1. Oracle check: the analytic oracle (``sd_jax.evaluation.oracle``) on real data-set images.
2. Adherence: every one of the 168 combinations x ``--seeds`` seeds, default sampler, 20 steps, CFG; the
   oracle scores shape, colour and background; joint accuracy on the 156 seen and the 12 held-out ones.
3. VAE: reconstruction PSNR on held-out-split images.
4. U-Net: denoising MSE (on the noise) and PSNR (of the decoded x0 estimate) at several noise levels.
5. Steps sweep: joint accuracy at 4, 8, 20, 50 steps for a few samplers (on a subset of combinations).
Writes ``results.json``, ``results.md`` and ``grid.png`` (prompts x seeds) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sd_jax.data import shapes
from sd_jax.evaluation.oracle import classify_batch


def _labels(combos):
    return np.asarray([(shapes.SHAPES.index(s), shapes.COLORS.index(c), shapes.COLORS.index(b)) for s, c, b in combos])


def oracle_accuracy(n: int = 1000) -> dict:
    out = {}
    for split in ("test", "heldout"):
        exs = [shapes.example(split, i) for i in range(n)]
        pred = classify_batch(np.stack([e["image"] for e in exs]))
        true = np.asarray([(e["shape"], e["color"], e["background"]) for e in exs])
        out[split] = float(np.mean(np.all(pred == true, axis=1)))
    return out


def generate(pipe, combos, seed: int, **kw) -> np.ndarray:
    """uint8 images for ``combos`` (one each) from ``seed``; the noise of combo ``i`` depends on (seed, i)."""
    return generate_prompts(pipe, [shapes.caption(*c) for c in combos], seed, **kw)


def generate_prompts(pipe, prompts, seed: int, *, steps=20, sampler="euler", guidance_scale=7.5, batch=96,
                     per_item: dict | None = None, size: int | None = None) -> np.ndarray:  # fmt: skip
    """uint8 images for ``prompts`` from ``seed``, in fixed-size batches (padded with the first item: one compile);
    the noise of prompt ``i`` depends on (seed, i) only. ``per_item``: more txt2img arguments with one row per
    prompt (e.g. ``control_image``), batched with the prompts. ``size``: pixels (default: the model's native size)."""
    per_item = dict(per_item or {})
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    f = pipe.vae_scale_factor
    keys = jax.random.split(jax.random.key(seed), len(prompts))
    noise = jax.vmap(lambda k: jax.random.normal(k, (size // f, size // f, pipe.latent_channels)))(keys)
    out = []
    starts = range(0, len(prompts), batch)
    bar = tqdm(
        starts, desc=f"{sampler} {steps} steps, seed {seed}", unit="batch", leave=False, file=sys.stderr, mininterval=0
    )  # few, slow batches: show each (the last one too)
    for i in bar:  # same shapes every call: one compile
        p, pad = list(prompts[i : i + batch]), batch - len(prompts[i : i + batch])
        rows = {k: np.concatenate([np.asarray(v[i : i + batch])] + [np.asarray(v[i : i + 1])] * pad)
                for k, v in {"noise": noise, **per_item}.items()}  # fmt: skip
        imgs, _ = pipe.txt2img(p + p[:1] * pad, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                               seed=seed, **rows)  # fmt: skip
        out.append(np.asarray(imgs)[: batch - pad])
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def adherence(pipe, combos, seeds, **kw) -> tuple[dict, np.ndarray]:
    truth = _labels(combos)
    hits, images = [], []
    for s in seeds:
        imgs = generate(pipe, combos, s, **kw)
        pred = classify_batch(imgs)
        hits.append(pred == truth)
        images.append(imgs)
    hits = np.stack(hits)  # [seeds, combos, 3]
    held = np.asarray([c in shapes.HELD_OUT for c in combos])

    def acc(mask):
        h = hits[:, mask]
        out = {k: float(h[..., i].mean()) for i, k in enumerate(("shape", "color", "background"))}
        return {"joint": float(h.all(-1).mean()), **out, "n": int(h.shape[0] * h.shape[1])}

    return {"seen": acc(~held), "heldout": acc(held)} if held.any() and (~held).any() else {
        "all": acc(held | ~held)
    }, np.stack(images)


def vae_psnr(pipe, n: int = 256) -> float:
    from sd_jax.models.vae import AutoencoderKL

    x = np.stack([shapes.example("heldout", i)["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1
    vae = pipe.vae

    def roundtrip(p, x):
        return vae.apply({"params": p}, vae.apply({"params": p}, x, method=AutoencoderKL.encode)[0],
                         method=AutoencoderKL.decode)  # fmt: skip

    f = jax.jit(roundtrip)
    rec = np.concatenate([np.asarray(f(pipe.params["vae"], x[i : i + 64])) for i in range(0, n, 64)])
    rec = np.clip((rec + 1) * 127.5, 0, 255).round()
    mse = np.mean((rec - (x + 1) * 127.5) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def denoising(pipe, timesteps=(50, 200, 400, 600, 800, 950), n: int = 64) -> list[dict]:
    """Noise test-split latents to timestep t, predict with the caption, score the noise and the x0 estimate."""
    from sd_jax.models.vae import AutoencoderKL

    exs = [shapes.example("test", i) for i in range(n)]
    x = np.stack([e["image"] for e in exs]).astype(np.float32) / 127.5 - 1
    cfg = pipe.vae.config
    mean, _ = pipe.vae.apply({"params": pipe.params["vae"]}, x, method=AutoencoderKL.encode)
    z0 = (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    cond, _ = pipe.conditioning([e["text"] for e in exs], None, 1.0, 64, 64, None)
    abar = jnp.asarray(pipe.schedule.alphas_cumprod())
    rows = []
    for t in timesteps:
        eps = jax.random.normal(jax.random.key(t), z0.shape)
        a = abar[t]
        zt = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * eps
        out = pipe.unet.apply({"params": pipe.params["unet"]}, zt, jnp.full((n,), t), cond["context"])
        if pipe.schedule.prediction_type == "v_prediction":
            eps_hat = jnp.sqrt(a) * out + jnp.sqrt(1 - a) * zt
        else:
            eps_hat = out
        z0_hat = (zt - jnp.sqrt(1 - a) * eps_hat) / jnp.sqrt(a)
        img = pipe.decode(z0_hat, safe=False) * 255
        mse_img = np.mean((img - (x + 1) * 127.5) ** 2, axis=(1, 2, 3))
        rows.append({"t": int(t), "eps_mse": float(jnp.mean((eps_hat - eps) ** 2)),
                     "x0_psnr_db": float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse_img, 1e-10))))})  # fmt: skip
    return rows


def grid(images: np.ndarray) -> np.ndarray:
    """[rows, cols, H, W, 3] -> one picture with 2 px gaps."""
    r, c, h, w, _ = images.shape
    out = np.full((r * (h + 2), c * (w + 2), 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            out[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = images[i, j]
    return out


def run(model=None, seeds=4, steps=20, sampler="euler", guidance_scale=7.5,
        sweep_samplers=("euler", "dpmpp_2m", "ddim"),
        sweep_steps=(4, 8, 20, 50), sweep_seen=24, out=None, log=print) -> dict:  # fmt: skip
    from sd_jax.embedded import default_model_path
    from sd_jax.pipelines.pipeline import StableDiffusion

    model = model or default_model_path()
    pipe = StableDiffusion.load(model)
    res = {"model": str(model), "seeds": seeds, "steps": steps, "sampler": sampler, "guidance_scale": guidance_scale}
    t0 = time.time()
    res["oracle_on_data"] = oracle_accuracy()
    log(f"oracle on data-set images: {res['oracle_on_data']}")
    combos = list(shapes.ALL_COMBINATIONS)
    res["adherence"], images = adherence(pipe, combos, range(seeds), steps=steps, sampler=sampler,
                                         guidance_scale=guidance_scale)  # fmt: skip
    log(f"adherence: {res['adherence']} ({time.time() - t0:.0f} s)")
    res["vae_psnr_db"] = vae_psnr(pipe)
    log(f"VAE PSNR on held-out images: {res['vae_psnr_db']:.2f} dB")
    res["denoising"] = denoising(pipe)
    log(f"denoising: {res['denoising']}")
    rng = np.random.default_rng(0)
    seen = [shapes.SEEN[i] for i in rng.choice(len(shapes.SEEN), sweep_seen, replace=False)]
    sub = seen + list(shapes.HELD_OUT)
    res["sweep"] = []
    for s in sweep_samplers:
        for n in sweep_steps:
            acc, _ = adherence(pipe, sub, [0], steps=n, sampler=s, guidance_scale=guidance_scale)
            res["sweep"].append(
                {"sampler": s, "steps": n, "seen": acc["seen"]["joint"], "heldout": acc["heldout"]["joint"]}
            )
            log(f"sweep {s} {n} steps: {res['sweep'][-1]}")
    res["seconds"] = time.time() - t0
    if out:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "results.md").write_text(markdown(res))
        from PIL import Image

        pick = [combos.index(c) for c in _grid_combos()]
        Image.fromarray(grid(images[:, pick].transpose(1, 0, 2, 3, 4))).save(out / "grid.png")
    return res


def _grid_combos():
    """A few seen combinations and the first held-out ones, one row each."""
    seen = [("circle", "red", "blue"), ("square", "yellow", "purple"), ("triangle", "green", "white"),
            ("circle", "black", "orange"), ("triangle", "blue", "red"), ("square", "white", "black")]  # fmt: skip
    return seen + list(shapes.HELD_OUT[:2]) + list(shapes.HELD_OUT[4:6]) + list(shapes.HELD_OUT[8:10])


def markdown(res: dict) -> str:
    a = res["adherence"]
    lines = [
        f"Model `{res['model']}`, sampler `{res['sampler']}`, {res['steps']} steps, CFG {res['guidance_scale']}, "
        f"{res['seeds']} seeds per combination.",
        "",
        "| set | images | joint | shape | colour | background |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("seen", "heldout"):
        r = a[k]
        lines.append(
            f"| {k} | {r['n']} | **{r['joint']:.1%}** | {r['shape']:.1%} | {r['color']:.1%} | {r['background']:.1%} |"
        )
    o = res["oracle_on_data"]
    lines += ["", f"Oracle on data-set images: test {o['test']:.1%}, held-out {o['heldout']:.1%}. "
              f"VAE reconstruction PSNR (held-out images): **{res['vae_psnr_db']:.2f} dB**.", "",
              "| noise timestep t | noise MSE | x0-estimate PSNR (dB) |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['t']} | {r['eps_mse']:.4f} | {r['x0_psnr_db']:.2f} |" for r in res["denoising"]]
    lines += ["", "Joint accuracy by steps (24 seen + 12 held-out combinations, 1 seed):", ""]
    steps = sorted({r["steps"] for r in res["sweep"]})
    lines += ["| sampler | " + " | ".join(f"{n} steps seen / held-out" for n in steps) + " |",
              "|---|" + "---|" * len(steps)]  # fmt: skip
    for s in dict.fromkeys(r["sampler"] for r in res["sweep"]):
        cells = [
            f"{r['seen']:.0%} / {r['heldout']:.0%}"
            for n in steps
            for r in res["sweep"]
            if r["sampler"] == s and r["steps"] == n
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sd_jax.evaluation.shapes_eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--out", default="eval_out")
    a = p.parse_args(argv)
    res = run(a.model, seeds=a.seeds, steps=a.steps, sampler=a.sampler, guidance_scale=a.guidance_scale, out=a.out)
    print(markdown(res))


if __name__ == "__main__":
    main()
