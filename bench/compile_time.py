"""(c) Compile time of the txt2img pipeline: cold, and warm through JAX's persistent compilation cache.

Each measurement is a fresh process: cold starts with an empty cache directory, warm
reuses the directory the cold run filled. Compile time is the first call minus the second.
"""

from __future__ import annotations

import shutil

from bench import models, txt2img
from bench.harness import FLAX, OURS, Outcome, Settings, WorkerError, one_shot
from bench.report import Table, comparison

ROWS = (("cold", "first_s", "cold: first call"), ("cold", "compile_s", "cold: compile (first − second call)"),
        ("warm", "first_s", "warm: first call"), ("warm", "compile_s", "warm: compile (first − second call)"),
        ("cold", "second_s", "steady call (second)"), ("cold", "load_s", "load pipeline"))  # fmt: skip


def run(st: Settings, ctx: dict) -> list[Table]:
    contenders = [c for c in st.contenders if c in (OURS, FLAX)]
    size = models.TINY if st.quick else models.SD15
    base = txt2img.spec(st, size, steps=1)  # compiling a scan does not depend on its length
    out = {(c, label): Outcome() for c in contenders for _, _, label in ROWS}
    root = models.cache_root() / "compile_cache"
    for r in range(st.repeats):
        for c in contenders:
            cache = root / f"{c}_{r}"
            shutil.rmtree(cache, ignore_errors=True)
            try:
                answers = {}
                for phase in ("cold", "warm"):
                    answers[phase] = one_shot(st, c, {**base, "task": "compile", "cache_dir": str(cache),
                                                      "label": f"{size.name} {phase}"})  # fmt: skip
                for phase, key, label in ROWS:
                    out[(c, label)].samples.append(answers[phase][key])
                st.log(f"  {c} round {r + 1}: cold {answers['cold']['compile_s']:.3g} s, "
                       f"warm {answers['warm']['compile_s']:.3g} s")  # fmt: skip
            except WorkerError as e:
                for _, _, label in ROWS:
                    out[(c, label)].error = str(e).splitlines()[0]
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    rows = [(label, {c: out[(c, label)] for c in contenders}) for _, _, label in ROWS]
    notes = [
        f"{size.name} txt2img, {base['size']}x{base['size']}, {base['steps']} DDIM steps, batch 1, fp32; "
        "every number from a fresh process. diffusers PyTorch runs eagerly and has no compile step.",
        "Persistent cache: `jax_compilation_cache_dir` with `jax_persistent_cache_min_compile_time_secs=0`. "
        "The rest of a warm first call is tracing and lowering, which the cache does not skip.",
        "Load: diffusers Flax converts the folder's PyTorch safetensors as its `from_pt` does (with the target "
        "shapes traced rather than a compiled random init).",
    ]
    return [comparison("(c) Pipeline compile time", "phase", "s", rows, contenders, notes=notes)]
