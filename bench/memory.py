"""(e) Peak resident memory of a fresh process that loads the pipeline and samples one image."""

from __future__ import annotations

from bench import models, txt2img
from bench.harness import Outcome, Settings, WorkerError, one_shot
from bench.report import Table, comparison

DTYPES = ("float32", "bfloat16")


def run(st: Settings, ctx: dict) -> list[Table]:
    size = models.TINY if st.quick else models.SD15
    rows = []
    for dtype in DTYPES:
        load, out = {}, {}
        for c in st.contenders:  # one process at a time: peaks must not overlap
            o, lo = out[c], load[c] = Outcome(), Outcome()
            try:
                ready = one_shot(st, c, {**txt2img.spec(st, size, dtype=dtype, steps=1), "task": "memory"})
                o.samples.append(ready["peak_rss_bytes"])
                if "load_peak_rss_bytes" in ready:
                    lo.samples.append(ready["load_peak_rss_bytes"])
            except WorkerError as e:
                o.error = lo.error = str(e).splitlines()[0]
        rows += [(f"{dtype}, after load", load), (f"{dtype}, load + sampling", out)]
    s = txt2img.spec(st, size, steps=1)
    notes = [
        f"{size.name} txt2img at batch 1, {s['size']}x{s['size']}, {s['steps']} DDIM steps, CFG; weights in the "
        "stated dtype (VAE upcast where the checkpoint asks). One fresh process each, peak `ru_maxrss` "
        "(includes the Python runtime and the libraries). `after load`: the peak once the pipeline is loaded, before "
        "the first call; `load + sampling`: the peak of the whole run.",
    ]
    return [comparison("(e) Peak memory (RSS) of sampling", "dtype, phase", "GiB", rows, st.contenders,
                       scale=1 / 2**30, notes=notes)]  # fmt: skip
