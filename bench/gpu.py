"""GPU mode: txt2img in bf16 against diffusers PyTorch (SDPA) and PyTorch + torch.compile, and the chip's use.

- SD 1.5 at 512x512: 50 Euler steps and 20 DPM++ 2M steps, batch 1 and 8;
- SDXL at 1024x1024: 30 Euler steps, batch 1;
- our SD 1.5 U-Net step at batch 16 (the CFG pair of 8 images): FLOP/s from XLA's cost analysis, against the
  chip's dense bf16 datasheet peak and a bf16 matmul measured in the same run.

Random weights, CFG 7.5, safety checker off. Needs jax with CUDA (``pip install "jax[cuda12]"``) and a CUDA build
of torch in the environment that runs the bench. ``--dry-run`` runs the same code with the tiny test models, 2
steps, batch 1 and 2 (and 4 for the U-Net), on whatever device there is: what the tests run on the CPU.
"""

from __future__ import annotations

from bench import models, txt2img
from bench.harness import OURS, TORCH, TORCH_COMPILE, Outcome, Settings, interleaved
from bench.report import Table, comparison, number

SD15_CASES = (("euler", 50), ("dpmpp_2m", 20))
BATCHES = (1, 8)
SDXL_CASE = ("euler", 30, 1)
UNET_BATCH = 16
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense, datasheets


def plan(st: Settings) -> list[tuple[models.Size, str, int, int]]:
    """``(model, sampler, steps, batch)`` of every txt2img row."""
    if st.dry_run:
        return [(models.TINY, s, 2, b) for s, _ in SD15_CASES for b in (1, 2)] + [(models.TINY_XL, "euler", 2, 1)]
    sd15 = [(models.SD15, s, n, b) for s, n in SD15_CASES for b in BATCHES]
    return sd15 + [(models.SDXL, *SDXL_CASE)]


def specs(st: Settings, size: models.Size, sampler: str, steps: int, batch: int) -> dict:
    base = txt2img.spec(st, size, dtype="bfloat16", batch=batch, sampler=sampler, steps=steps,
                        image_size=size.image_size)  # fmt: skip
    if size is models.TINY_XL:
        base["folder"] = str(size.configs)  # the fixture is a diffusers folder already
    device = "cpu" if st.dry_run else "cuda"
    out = {
        OURS: base,
        TORCH: {**base, "device": device},
        TORCH_COMPILE: {**base, "device": device, "compile": "reduce-overhead"},
    }
    return {c: out[c] for c in st.contenders if c in out}


def run(st: Settings, ctx: dict) -> list[Table]:
    contenders = [c for c in st.contenders if c in (OURS, TORCH, TORCH_COMPILE)]
    rows, firsts = [], []
    for size, sampler, steps, batch in plan(st):
        label = f"{size.name} {size.image_size}², {sampler}, {steps} steps, batch {batch}"
        out = interleaved(st, specs(st, size, sampler, steps, batch))
        rows.append((label, out))
        firsts.append((label, {c: Outcome([o.extra["first_s"]]) if "first_s" in o.extra else Outcome(error=o.error)
                               for c, o in out.items()}))  # fmt: skip
    notes = [
        "Random weights, bf16 weights and activations, guidance 7.5 (the U-Net runs on the CFG pair), safety checker "
        "off. Seconds per image = seconds per batch / batch size." + (" Dry run: tiny models." if st.dry_run else ""),
        "diffusers PyTorch: `DiffusionPipeline`, SDPA attention; + torch.compile: "
        "`torch.compile(unet, mode='reduce-overhead', fullgraph=True)`, channels-last. Ours: one jitted sampling loop, "
        "`attention='auto'` (cuDNN flash attention on GPU).",
    ]
    tables = [
        comparison("GPU txt2img", "model, sampler, steps, batch", "s/image", rows, contenders, notes=notes),
        comparison(
            "GPU first call (compile / autotune / warm-up)", "model, sampler, steps, batch", "s", firsts, contenders
        ),  # fmt: skip
    ]
    if OURS in contenders:
        tables.append(utilization(st))
    return tables


def utilization(st: Settings) -> Table:
    """Our U-Net step's achieved FLOP/s at batch 16 against the chip's bf16 peak."""
    size = models.TINY if st.dry_run else models.SD15
    batch = 4 if st.dry_run else UNET_BATCH
    ctx_len = size.context[0]
    step = {"task": "unet_step", "dtype": "bfloat16", "batch": batch, "latent_size": size.latent_size,
            "context_len": ctx_len, "unet_config": size.unet_config,
            "label": f"{size.name} U-Net batch {batch}"}  # fmt: skip
    n = 1024 if st.dry_run else 8192
    ours = interleaved(st, {OURS: step})[OURS]
    peak = interleaved(st, {OURS: {"task": "matmul", "n": n, "dtype": "bfloat16", "label": f"{n}² bf16"}})[OURS]
    device = st.versions.get(OURS, {}).get("jax_device", "")
    sheet = next((v for k, v in PEAK_BF16.items() if k.lower() in device.lower()), None)
    t = Table(f"GPU U-Net step, batch {batch}, bf16: share of the chip's peak",
              ["device", "TFLOP per step (XLA)", "step [s]", "achieved TFLOP/s", f"matmul {n}² TFLOP/s",
               "% of matmul", "datasheet bf16 TFLOP/s", "% of datasheet"])  # fmt: skip
    flops = ours.extra.get("flops")
    if ours.median is None or not flops or peak.median is None:
        t.rows.append([device or "?", number(flops and flops / 1e12), number(ours.median), "n/a", "n/a", "n/a",
                       number(sheet and sheet / 1e12), f"n/a ({ours.error or peak.error})"])  # fmt: skip
        return t
    achieved, top = flops / ours.median, peak.extra["flops"] / peak.median
    t.rows.append(
        [
            device,
            number(flops / 1e12),
            number(ours.median),
            number(achieved / 1e12),
            number(top / 1e12),
            f"{100 * achieved / top:.1f}%",
            number(sheet and sheet / 1e12),
            f"{100 * achieved / sheet:.1f}%" if sheet else "n/a (no datasheet figure for this device)",
        ]
    )
    t.notes = [f"{size.name} U-Net, {size.latent_size}x{size.latent_size} latents (batch {batch} = the CFG pair of "
               f"{batch // 2} images). XLA counts a multiply-add as 2 FLOPs; datasheet peaks are dense."]  # fmt: skip
    return t
