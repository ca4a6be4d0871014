"""python -m bench.profile [--full] [--dtype bfloat16] [--steps 3] [--top 25] [--out-dir bench_profile]

Where the time of our U-Net step goes: runs the jitted step under the JAX profiler, sums the
time of each XLA instruction (``hlo_op`` events of the trace), joins them with the optimized
HLO (opcode, shape, and the JAX/Flax name stack of its ``op_name``), and prints the top
instructions, the time per primitive and per model block, and XLA's cost analysis.
Writes the trace (TensorBoard / Perfetto: ``*.xplane.pb``) and the optimized HLO to ``--out-dir``.
Default is the tiny U-Net (seconds); ``--full`` is SD 1.5 at 64x64 latents, batch 2 (~30 s per step on 2 cores).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import statistics
import sys
import time

from bench import models, unet_step

INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(")
OP_NAME = re.compile(r'op_name="([^"]*)"')
KIND = re.compile(r"kind=(\w+)")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """Instruction name -> {opcode, shape, op_name} of every computation in the optimized HLO."""
    out = {}
    for line in hlo_text.splitlines():
        m = INSTR.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        op = OP_NAME.search(line)
        kind = KIND.search(line)
        if opcode == "fusion" and kind:
            opcode = f"fusion:{kind.group(1)}"
            if '"__ynn_fusion"' in line:
                opcode = "fusion:ynnpack"
        out[name] = {"opcode": opcode, "shape": shape, "op_name": op.group(1) if op else ""}
    return out


def op_times(trace_dir: pathlib.Path) -> dict[str, float]:
    """Summed nanoseconds per ``hlo_op`` over every thread of the newest trace in ``trace_dir``."""
    from jax.profiler import ProfileData

    files = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: the profiler wrote no trace")
    data = ProfileData.from_file(str(files[-1]))
    total = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                if "hlo_op" in stats:
                    total[str(stats["hlo_op"])] += ev.duration_ns
    return dict(total)


def split_op_name(op_name: str) -> tuple[list[str], str]:
    """``jit(f)/UNet2DConditionModel/down_blocks_0/.../dot_general`` -> (module path, primitive)."""
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "pjit(", "checkpoint", "remat"))]
    if not parts:
        return [], "?"
    return parts[:-1], parts[-1]


def report(times: dict[str, float], instrs: dict[str, dict], steps: int, top: int, depth: int) -> str:
    per_step = {k: v / steps / 1e6 for k, v in times.items()}  # ms per step
    total = sum(per_step.values()) or 1.0
    lines = [f"summed XLA op time: {total:.1f} ms/step (ops on parallel threads add up, so this can exceed wall)", ""]
    lines += [f"top {top} instructions", f"{'ms/step':>9} {'%':>6}  {'opcode':<16} {'shape':<28} op_name"]
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:top]:
        i = instrs.get(name, {"opcode": "?", "shape": "?", "op_name": name})
        lines.append(
            f"{ms:9.2f} {100 * ms / total:5.1f}%  {i['opcode']:<16} {i['shape'][:28]:<28} {i['op_name'][-90:]}"
        )
    groupings = (
        ("by primitive", lambda i: split_op_name(i["op_name"])[1]),
        ("by opcode", lambda i: i["opcode"]),
        (f"by model block (depth {depth})", lambda i: "/".join(split_op_name(i["op_name"])[0][1 : 1 + depth])),
    )
    for title, key in groupings:
        groups = collections.Counter()
        for name, ms in per_step.items():
            groups[key(instrs.get(name, {"opcode": "?", "op_name": ""})) or "(top level)"] += ms
        lines += ["", title] + [f"{ms:9.2f} {100 * ms / total:5.1f}%  {g}" for g, ms in groups.most_common(top)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="SD 1.5 shapes instead of the tiny U-Net")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps before them")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--depth", type=int, default=2, help="model-block grouping depth (1: down/mid/up blocks)")
    p.add_argument("--out-dir", default="bench_profile")
    args = p.parse_args(argv)

    import jax

    from bench.workers.ours import build_unet_step

    size = models.SD15 if args.full else models.TINY
    spec = unet_step.spec(size, args.dtype)
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"building the {size.name} U-Net step ({args.dtype})...", file=sys.stderr)
    step, inputs, compile_s = build_unet_step(spec)
    (out / "unet_step.hlo.txt").write_text(step.as_text())
    for _ in range(args.warmup):
        step(*inputs).block_until_ready()
    walls = []
    trace_dir = out / "trace"
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(*inputs).block_until_ready()
            walls.append(time.perf_counter() - t0)
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, nbytes = float(cost.get("flops", 0)), float(cost.get("bytes accessed", 0))
    wall = statistics.median(walls)
    print(f"{size.name} U-Net step, batch 2, {args.dtype}: compile {compile_s:.1f} s; median wall {wall * 1e3:.1f} ms "
          f"over {args.steps} profiled steps (profiling adds overhead)")  # fmt: skip
    print(f"XLA cost analysis: {flops / 1e9:.2f} GFLOP, {nbytes / 1e9:.2f} GB accessed -> "
          f"{flops / wall / 1e9:.1f} GFLOP/s achieved\n")  # fmt: skip
    print(report(op_times(trace_dir), hlo_instructions(step.as_text()), args.steps, args.top, args.depth))
    print(f"\ntrace: {trace_dir} (open with TensorBoard's profile plugin or ui.perfetto.dev); "
          f"HLO: {out / 'unet_step.hlo.txt'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
