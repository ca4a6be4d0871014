"""(a) U-Net step latency: one forward at batch 2 (the CFG pair), random weights, fp32 and bf16."""

from __future__ import annotations

from bench import models
from bench.harness import Settings, interleaved
from bench.report import Table, comparison

DTYPES = ("float32", "bfloat16")


def spec(size: models.Size, dtype: str) -> dict:
    n, dim = size.context
    return {"task": "unet_step", "unet_config": size.unet_config, "batch": 2, "latent_size": size.latent_size,
            "context_len": n, "dtype": dtype, "label": f"{size.name} {dtype}"}  # fmt: skip


def measure(st: Settings, contenders, ctx: dict) -> dict:
    """``{dtype: {contender: Outcome}}``, kept in ``ctx`` for the FLOP/s family."""
    size = models.TINY if st.quick else models.SD15
    results = ctx.setdefault("unet_step", {})
    for dtype in DTYPES:
        todo = [c for c in contenders if c not in results.get(dtype, {})]
        if todo:
            results.setdefault(dtype, {}).update(interleaved(st, {c: spec(size, dtype) for c in todo}))
    ctx["unet_size"] = size
    return results


def run(st: Settings, ctx: dict) -> list[Table]:
    results = measure(st, st.contenders, ctx)
    size = ctx["unet_size"]
    n, dim = size.context
    s = size.latent_size
    rows = [(dtype, results[dtype]) for dtype in DTYPES]
    notes = [
        f"{size.name} U-Net ({size.configs.relative_to(models.REPO)}/unet/config.json"
        f"{' + ' + str(size.unet_overrides) if size.unet_overrides else ''}), random weights; "
        f"latents 2x4x{s}x{s}, context 2x{n}x{dim}; weights and activations in the stated dtype.",
        "ours: `jax.jit` of `UNet2DConditionModel.apply`; diffusers PyTorch: `eval()`, `torch.no_grad()`, "
        "SDPA attention; diffusers Flax: `jax.jit` of `FlaxUNet2DConditionModel.apply`. Compile/first call excluded.",
    ]
    return [comparison("(a) U-Net step latency", "dtype", "s/step", rows, st.contenders, notes=notes)]
