"""(h) Device memory at scale, from XLA's compiled memory analysis (no device needed): what fits 16 and 80 GiB.

SDXL 1024x1024 sampling at batch 1 and 8 in bf16 on one device, and SD 1.5 / SDXL fine-tuning per device under
the ``dp``, ``fsdp`` and ``fsdp_tp`` presets on a simulated 2x4 mesh (``bench/workers/memory_scale.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench.harness import REPO, Settings, worker_env
from bench.report import Table

GiB = 2**30
CHIPS = (("16 GiB (TPU v5e)", 16 * GiB), ("80 GiB (H100/A100-80G)", 80 * GiB))
MESHES = {"dp": (2, 4, 1), "fsdp": (2, 4, 1), "fsdp_tp": (1, 4, 2)}
TRAIN_BATCH = 64  # global: 8 images per device on the 8-device mesh
MODELS = {  # name -> (configs-only folder, fine-tune config), full size and --quick
    "full": {"SD 1.5": ("sd_jax/model_configs/sd15", "configs/sd15_finetune.py", 512),
             "SDXL": ("sd_jax/model_configs/sdxl_base", "configs/sdxl_finetune.py", 1024)},
    "quick": {"tiny SD": ("tests/fixtures/sd1", "configs/sd15_finetune.py", 64),
              "tiny SDXL": ("tests/fixtures/sdxl", "configs/sdxl_finetune.py", 64)},
}  # fmt: skip


def measure(spec: dict, log=print, timeout: int = 3600) -> dict:
    """One worker process with 8 simulated CPU devices; returns its JSON answer (or ``{"error": ...}``)."""
    env = worker_env()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "bench.workers.memory_scale", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        log(f"memory_scale worker failed: {last}")
        return {"error": last[:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _gib(b) -> str:
    return f"{b / GiB:.2f}" if isinstance(b, (int, float)) else "n/a"


def _fits(b) -> list[str]:
    return ["yes" if b <= cap else "no" for _, cap in CHIPS] if isinstance(b, (int, float)) else ["n/a"] * len(CHIPS)


def run(st: Settings, ctx: dict) -> list[Table]:
    models = MODELS["quick" if st.quick else "full"]
    xl_name = [n for n in models if "XL" in n][0]
    folder, _, size = models[xl_name]
    fits = [f"fits {name}" for name, _ in CHIPS]
    s = Table(f"(h) {xl_name} {size}x{size} sampling, bf16, one device (XLA's memory analysis)",
              ["batch", "U-Net step (CFG pair) [GiB]", "VAE decode [GiB]", "weights [GiB]", "peak [GiB]",
               *fits])  # fmt: skip
    for batch in (1, 8):
        st.log(f"[h] sampling {xl_name} batch {batch}")
        r = measure({"task": "sampling", "folder": str(REPO / folder), "batch": batch, "image_size": size,
                     "dtype": "bfloat16"}, st.log)  # fmt: skip
        s.rows.append([str(batch), _gib(r.get("unet_step")), _gib(r.get("vae_decode")), _gib(r.get("weights")),
                       _gib(r.get("peak")) if "peak" in r else f"n/a ({r.get('error')})",
                       *_fits(r.get("peak"))])  # fmt: skip
    s.notes = ["Peak = the larger of (U-Net step + the VAE and text encoders' weights) and (VAE decode, fp32 as SDXL's "
               "`force_upcast` asks, + the U-Net's and text encoders' weights). Compiled by XLA:CPU with the "
               "`blocked` attention kernel, which like cuDNN/Pallas flash attention never holds a whole score "
               "matrix: an estimate of what an accelerator needs."]  # fmt: skip
    t = Table(f"(h) Fine-tuning memory per device, 8 devices, global batch {TRAIN_BATCH} (XLA's memory analysis)",
              ["model, preset, mesh (data, fsdp, tensor)", "weights + Adam + EMA [GiB]", "whole step [GiB]",
               *fits])  # fmt: skip
    for name, (folder, config, image_size) in models.items():
        for preset, mesh in MESHES.items():
            st.log(f"[h] training {name} {preset} {mesh}")
            r = measure({"task": "training", "folder": str(REPO / folder), "config": str(REPO / config),
                         "sharding": preset, "mesh": list(mesh),
                         "overrides": {"batch_size": TRAIN_BATCH}, "image_size": image_size}, st.log)  # fmt: skip
            label = f"{name}, {preset}, {mesh}"
            t.rows.append([label, _gib(r.get("state")), _gib(r.get("step")) if "step" in r else
                           f"n/a ({r.get('error')})", *_fits(r.get("step"))])  # fmt: skip
    t.notes = [
        "Our trainer's jitted step (`Trainer._step`) lowered on abstract weights: fp32 master weights, Adam moments "
        "and EMA, bf16 compute, `remat_policy=nothing_saveable`, the frozen VAE encoding the batch, as the configs "
        f"`configs/sd15_finetune.py` (512 px) and `configs/sdxl_finetune.py` (1024 px) set them, global batch "
        f"{TRAIN_BATCH}. The `blocked` attention recomputes each block's scores in the backward pass, as flash "
        "kernels do.",
        "`weights + Adam + EMA`: exact, from each array's shard shape (the trained state plus the frozen models); "
        "`whole step`: XLA:CPU's plan for the step (state, batch, activations and temporaries), which also holds "
        "CPU-only buffers (convolution workspaces): an upper estimate for an accelerator. `fits` reads the whole "
        "step.",
    ]
    return [s, t]
