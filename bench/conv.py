"""python -m bench.conv [--dtype float32] [--repeats 5] [--unet]: the convolution algorithms of
``sd_jax.models.conv_kernels`` side by side, in one process, on the 3x3 convolutions of SD 1.5 at 512 px (the CFG
pair: batch 2) and of the embedded model (batch 32), then with ``--unet`` the SD 1.5 U-Net step (batch 2, 64x64
latents) under ``xla`` and under the ``cpu`` rule, each compiled in its own process.

Prints markdown tables (median milliseconds, GFLOP/s, max |difference| to XLA's): the measurements the ``cpu``
rule is written from (BENCHMARKS.md keeps them).
"""

from __future__ import annotations

import argparse
import sys
import time

SHAPES = [  # (batch, side, in channels, out channels)
    (2, 64, 320, 320), (2, 64, 640, 320), (2, 32, 640, 640), (2, 32, 1280, 640), (2, 16, 1280, 1280),
    (2, 16, 2560, 1280), (2, 8, 1280, 1280), (2, 8, 2560, 1280), (32, 16, 64, 64), (32, 8, 128, 128),
    (32, 4, 128, 128),
]  # fmt: skip


def _median(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def convs(dtype: str, repeats: int) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sd_jax.models import conv_kernels as ck

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    dn = ("NHWC", "HWIO", "NHWC")
    algos = {
        "xla": lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn),
        "im2col": ck.im2col,
        "shifted": ck.shifted,
    }
    lines = [f"| 3x3 conv ({dtype}) | GFLOP | " + " | ".join(f"{a} [ms]" for a in algos) + " | `cpu` rule picks |",
             "|---|---|" + "---|" * len(algos) + "---|"]  # fmt: skip
    for b, s, ci, co in SHAPES:
        k1, k2 = jax.random.split(jax.random.key(0))
        x = jax.random.normal(k1, (b, s, s, ci), jnp.float32).astype(dt)
        w = (jax.random.normal(k2, (3, 3, ci, co), jnp.float32) / np.sqrt(9 * ci)).astype(dt)
        gflop = 2 * b * s * s * ci * co * 9 / 1e9
        ref = np.asarray(jax.jit(algos["xla"])(x, w), np.float32)
        cells = []
        for fn in algos.values():
            f = jax.jit(fn)
            sec = _median(lambda f=f, x=x, w=w: f(x, w), repeats)
            err = float(np.abs(np.asarray(f(x, w), np.float32) - ref).max())
            cells.append(f"{sec * 1e3:.1f} ({gflop / sec:.0f} GFLOP/s, {err:.0e})")
        lines.append(f"| {b}x{s}x{s}x{ci} -> {co} | {gflop:.2f} | " + " | ".join(cells) +
                     f" | {ck.cpu_choice(s, s, ci)} |")  # fmt: skip
    return "\n".join(lines)


def unet(dtype: str, repeats: int) -> str:
    from bench import models, unet_step
    from bench.harness import OURS, Settings, Worker

    st = Settings(quick=False, repeats=repeats, contenders=(OURS,), log=lambda m: print(m, file=sys.stderr))
    rows = []
    for conv in ("xla", "cpu", "xla"):  # the default measured first and last (drift bound)
        w = Worker(st, OURS, {**unet_step.spec(models.SD15, dtype), "conv": conv})
        try:
            times = sorted(float(w.call()["seconds"]) for _ in range(repeats))
        finally:
            w.close()
        rows.append((conv, times[len(times) // 2], w.ready["compile_s"]))
    base = rows[0][1]
    lines = [f"| SD 1.5 U-Net step, batch 2, 64x64 latents, {dtype} | step [s] | vs xla (first) | compile [s] |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| conv={c} | {t:.2f} | {base / t:.2f}x | {cs:.0f} |" for c, t, cs in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.conv", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--unet", action="store_true", help="also the SD 1.5 U-Net step under xla and the cpu rule")
    a = p.parse_args(argv)
    print(convs(a.dtype, a.repeats), flush=True)
    if a.unet:
        print()
        print(unet(a.dtype, max(3, a.repeats // 2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
