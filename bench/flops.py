"""(f) Achieved FLOP/s of our U-Net step against a dense matmul peak measured in the same run.

FLOPs come from XLA's cost analysis of the compiled step (``jit(f).lower(...).compile().cost_analysis()``);
the step time is the (a) median (measured here if (a) did not run).
"""

from __future__ import annotations

from bench import unet_step
from bench.harness import OURS, Settings, interleaved
from bench.report import Table, number


def run(st: Settings, ctx: dict) -> list[Table]:
    results = unet_step.measure(st, (OURS,), ctx)
    n = 1024 if st.quick else 4096
    t = Table("(f) Achieved FLOP/s of our U-Net step",
              ["dtype", "GFLOP per step (XLA)", "step [s]", "achieved GFLOP/s", f"matmul {n}² peak GFLOP/s",
               "% of peak"])  # fmt: skip
    for dtype in unet_step.DTYPES:
        ours = results[dtype][OURS]
        peak = interleaved(st, {OURS: {"task": "matmul", "n": n, "dtype": dtype, "label": f"{n}² {dtype}"}})[OURS]
        flops = ours.extra.get("flops")
        if ours.median is None or not flops or peak.median is None:
            t.rows.append([dtype, number(flops and flops / 1e9), number(ours.median), "n/a", "n/a",
                           f"n/a ({ours.error or peak.error})"])  # fmt: skip
            continue
        achieved = flops / ours.median
        top = peak.extra["flops"] / peak.median
        t.rows.append([dtype, number(flops / 1e9), number(ours.median), number(achieved / 1e9), number(top / 1e9),
                       f"{100 * achieved / top:.1f}%"])  # fmt: skip
    size = ctx["unet_size"]
    t.notes = [
        f"{size.name} U-Net at the shapes of (a). The peak is the median of a jitted {n}x{n} matmul in the same "
        "dtype, 2n³ FLOPs. XLA counts a multiply-add as 2 FLOPs.",
    ]
    return [t]
