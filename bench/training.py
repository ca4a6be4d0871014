"""(d) Training throughput (images/s): our trainer's jitted step against a plain diffusers PyTorch loop.

The PyTorch loop is built from the models our trainer built (same U-Net, VAE and text encoder
configs, batch, resolution, noise schedule, loss, AdamW, clipping and EMA): ours reports them.
"""

from __future__ import annotations

from bench.harness import OURS, REPO, TORCH, Settings, interleaved
from bench.report import Table, comparison

CONFIGS = (("tiny", "configs/tiny.py"), ("embedded model", "configs/shapes_unet.py"))
TORCH_KEYS = ("unet_config", "vae_config", "text_config", "trainable", "alphas_cumprod", "prediction_type",
              "min_snr_gamma", "compute_dtype", "optim", "batch_size", "image_size")  # fmt: skip


def torch_spec(steps: int):
    def build(ready: dict) -> dict:
        if OURS not in ready:
            raise ValueError("needs our trainer's models (ours did not start)")
        return {"task": "train", "steps_per_run": steps, **{k: ready[OURS][k] for k in TORCH_KEYS}}

    return build


def run(st: Settings, ctx: dict) -> list[Table]:
    contenders = [c for c in (OURS, TORCH) if c in st.contenders]
    steps = 3 if st.quick else 10
    rows, notes = [], []
    for name, path in CONFIGS:
        if not (REPO / path).exists():
            notes.append(f"`{path}` ({name}) is not in this checkout: row skipped.")
            continue
        specs = {OURS: {"task": "train", "config": str(REPO / path), "steps_per_run": steps, "label": path}}
        if TORCH in contenders:
            specs[TORCH] = torch_spec(steps)
        out = interleaved(st, {c: specs[c] for c in contenders}, key="images_per_s")
        info = out[OURS].extra if OURS in out else {}
        desc = f"{name} (`{path}`)"
        if info:
            desc += (f": batch {info['batch_size']}, {info['image_size']}px, "
                     f"U-Net {info['params'] / 1e6:.2f}M params, {info['compute_dtype']}")  # fmt: skip
        rows.append((desc, out))
    notes += [
        f"Each sample: {steps} steps after two warm-up steps (the first compiles). Both do per step: frozen VAE "
        "encode, text encoder (trained if the config trains it), noise, U-Net forward and backward, MSE "
        "(min-SNR-γ weighted), global-norm clipping, AdamW, EMA. Ours runs the config's trainer "
        "(data-parallel mesh over the devices) on synthetic batches "
        "prepared before timing, with random weights for components it would load from an earlier run.",
    ]
    return [comparison("(d) Training throughput", "config", "images/s", rows, contenders, higher_is_better=True,
                       notes=notes)]  # fmt: skip
