"""GPU mode: SD 1.5 txt2img at 512x512 in bf16, batch 1 and 8, against diffusers PyTorch (SDPA, torch.compile).

Samplers: 50 steps DDIM, 50 steps Euler, 20 steps DPM++ 2M, CFG 7.5, random weights. Needs jax with
CUDA (``pip install "jax[cuda12]"``) and a CUDA build of torch in the environment that runs the bench.
"""

from __future__ import annotations

from bench import models, txt2img
from bench.harness import OURS, TORCH, TORCH_COMPILE, Outcome, Settings, interleaved
from bench.report import Table, comparison

CASES = (("ddim", 50), ("euler", 50), ("dpmpp_2m", 20))
BATCHES = (1, 8)


def specs(st: Settings, sampler: str, steps: int, batch: int) -> dict:
    base = txt2img.spec(st, models.SD15, dtype="bfloat16", batch=batch, sampler=sampler, steps=steps, image_size=512)
    out = {
        OURS: base,
        TORCH: {**base, "device": "cuda"},
        TORCH_COMPILE: {**base, "device": "cuda", "compile": "reduce-overhead"},
    }
    return {c: out[c] for c in st.contenders if c in out}


def run(st: Settings, ctx: dict) -> list[Table]:
    contenders = [c for c in st.contenders if c in (OURS, TORCH, TORCH_COMPILE)]
    rows, firsts = [], []
    for sampler, steps in CASES:
        for batch in BATCHES:
            label = f"{sampler}, {steps} steps, batch {batch}"
            out = interleaved(st, specs(st, sampler, steps, batch))
            rows.append((label, out))
            firsts.append((label, {c: Outcome([o.extra["first_s"]]) if "first_s" in o.extra else Outcome(error=o.error)
                                   for c, o in out.items()}))  # fmt: skip
    notes = [
        "SD 1.5 architecture with random weights, 512x512, bf16 weights and activations, guidance 7.5 (the U-Net "
        "runs on the CFG pair), safety checker off. Seconds per image = seconds per batch / batch size.",
        "diffusers PyTorch: `StableDiffusionPipeline`, SDPA attention; + torch.compile: "
        "`torch.compile(unet, mode='reduce-overhead', fullgraph=True)`, channels-last. Ours: one jitted sampling loop.",
    ]
    return [
        comparison("GPU txt2img", "sampler, steps, batch", "s/image", rows, contenders, notes=notes),
        comparison("GPU first call (compile / autotune / warm-up)", "sampler, steps, batch", "s", firsts, contenders),
    ]
