"""python -m bench.xla_flags [--latent 64] [--dtype float32] [--repeats 3]: our SD 1.5 U-Net step under the XLA:CPU
flags this jaxlib offers, each set in its own process, the default measured first and last (drift bound).

Prints a markdown table (median seconds, ratio to the default): the record BENCHMARKS.md keeps of what helped and
what did not. A flag that helps becomes a default only after the parity tests pass under it.
"""

from __future__ import annotations

import argparse
import sys

from bench import models, unet_step
from bench.harness import OURS, Settings, Worker, WorkerError

FLAG_SETS = {
    "default": "",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "XNNPACK": "--xla_cpu_use_xnnpack=true",
    "XNN fusions (default)": "--xla_cpu_experimental_xnn_fusion_type=XNN_FUSION_TYPE_DEFAULT",
    "no thunk runtime": "--xla_cpu_use_thunk_runtime=false",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "no new fusion emitters": "--xla_cpu_use_fusion_emitters=false",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.xla_flags", description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=64, help="latent side (64: SD 1.5 at 512 px)")
    p.add_argument("--dtype", default="float32", choices=unet_step.DTYPES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated names of FLAG_SETS")
    args = p.parse_args(argv)
    st = Settings(quick=False, repeats=args.repeats, contenders=(OURS,), log=lambda m: print(m, file=sys.stderr))
    spec = {**unet_step.spec(models.SD15, args.dtype), "latent_size": args.latent}
    names = [n.strip() for n in args.only.split(",")] if args.only else list(FLAG_SETS)
    rows, base = [], None
    for name in [*names, "default"] if names[0] == "default" else names:
        flags = FLAG_SETS[name]
        st.log(f"{name}: XLA_FLAGS={flags!r}")
        try:
            w = Worker(st, OURS, {**spec, "xla_flags": flags})
        except WorkerError as e:
            rows.append((name, flags, None, str(e).splitlines()[0]))
            continue
        try:
            times = sorted(float(w.call()["seconds"]) for _ in range(args.repeats))
        finally:
            w.close()
        median = times[len(times) // 2]
        base = base or median
        rows.append((name, flags, median, f"compile {w.ready['compile_s']:.0f} s"))
    print(f"| XLA:CPU flags (SD 1.5 U-Net, batch 2, {args.latent}x{args.latent} latents, {args.dtype}) | step [s] | "
          "vs default | note |\n|---|---|---|---|")  # fmt: skip
    for name, flags, median, note in rows:
        ratio = f"{base / median:.2f}x" if median else "n/a"
        cell = f"{median:.3f}" if median else "failed"
        print(f"| {name} (`{flags or 'none'}`) | {cell} | {ratio} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
