"""(b) End-to-end txt2img, seconds per image: prompt encoding, DDIM sampling with CFG 7.5, VAE decoding."""

from __future__ import annotations

from bench import models
from bench.harness import Settings, interleaved
from bench.report import Table, comparison

PROMPT = "a photograph of an astronaut riding a horse"


def spec(st: Settings, size: models.Size, dtype="float32", batch=1, sampler="ddim", steps=None, image_size=None):
    return {"task": "txt2img", "folder": str(models.folder(size, st.log)), "dtype": dtype, "batch": batch,
            "steps": steps or size.steps, "size": image_size or size.image_size, "sampler": sampler,
            "guidance": 7.5, "prompt": PROMPT, "label": f"{size.name} {dtype} batch {batch}"}  # fmt: skip


def run(st: Settings, ctx: dict) -> list[Table]:
    cases = [(models.TINY, None)] if st.quick else [(models.TINY, None), (models.SD15, None), (models.SD15, 20)]
    rows = []
    for size, steps in cases:  # SD 1.5 at 20 steps: the end-to-end row the performance targets read
        s = spec(st, size, steps=steps)
        out = interleaved(st, {c: s for c in st.contenders})
        rows.append((f"{size.name}, {s['size']}x{s['size']}, {s['steps']} DDIM steps", out))
    notes = [
        "Batch 1, fp32, guidance scale 7.5 (the U-Net runs on the CFG pair), safety checker off, random weights "
        "(`tiny`: the test fixture's architecture with a 32-group U-Net that diffusers Flax can build; "
        "`sd15`: SD 1.5 configs). The first call (compilation) is excluded.",
        "diffusers PyTorch: `StableDiffusionPipeline` + `DDIMScheduler`; diffusers Flax: "
        "`FlaxStableDiffusionPipeline(jit=True)` + `FlaxDDIMScheduler`; "
        "ours: `StableDiffusion.txt2img(sampler='ddim')`.",
    ]
    return [comparison("(b) txt2img end to end", "model, size, steps", "s/image", rows, st.contenders, notes=notes)]
