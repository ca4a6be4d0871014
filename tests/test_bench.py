"""``python -m bench --quick`` end to end for ours; the worker protocol, the report and the profiler."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from bench import profile
from bench.harness import OURS, TORCH, Outcome, Settings, interleaved
from bench.report import advantage, comparison

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _row(text: str, label: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_quick_unet_step_writes_a_table_with_numbers(tmp_path):
    out = tmp_path / "BENCH.md"
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "a", "--contenders", "ours", "--repeats", "2",
           "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "# sd-jax benchmarks" in text and "### (a) U-Net step latency" in text
    assert "cores" in text and f"jax {jax.__version__}" in text
    for dtype in ("float32", "bfloat16"):
        cells = _row(text, dtype)
        median = float(cells[1].split()[0])  # "0.0116 (0.0115–0.0117)"
        assert 0 < median < 10, cells
        lo, hi = (float(x) for x in cells[1].split("(")[1].rstrip(")").split("–"))
        assert lo <= median <= hi
    assert text == r.stdout[: len(text)]  # printed as well as written


def test_a_failing_worker_is_reported_not_fatal():
    st = Settings(quick=True, repeats=2, contenders=(OURS,), log=lambda m: None)
    out = interleaved(st, {OURS: {"task": "no_such_task"}})
    assert out[OURS].samples == [] and "KeyError" in out[OURS].error


def test_report_ratios_and_cells():
    ours, other = Outcome([1.0, 2.0, 3.0]), Outcome([4.0, 4.0])
    assert advantage(ours, other, higher_is_better=False) == "2.00×"  # other takes twice as long
    assert advantage(ours, other, higher_is_better=True) == "0.50×"
    assert advantage(ours, Outcome(error="boom"), False) == "n/a"
    t = comparison("t", "what", "s", [("row", {OURS: ours, TORCH: Outcome(error="no torch")})], (OURS, TORCH))
    assert t.rows[0] == ["row", "2 (1–3)", "n/a (no torch)", "n/a"]
    assert "| what | sd-jax (ours) [s] | diffusers PyTorch [s] | ours vs diffusers PyTorch |" in t.markdown()


def test_cli_rejects_unknown_families_and_contenders():
    from bench.__main__ import parse

    with pytest.raises(SystemExit):
        parse(["--only", "a,z"])
    with pytest.raises(SystemExit):
        parse(["--contenders", "ours,tensorflow"])
    args = parse(["--quick", "--only", "a,f"])
    assert args.only == ["a", "f"] and args.repeats == 2 and args.out == "BENCHMARKS_quick.md"


def test_profile_attributes_time_to_named_instructions(tmp_path):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(256, name="proj")(nn.Conv(64, (3, 3), name="conv_a")(x))

    net, x = Net(), jnp.ones((4, 32, 32, 8))
    params = net.init(jax.random.key(0), x)
    step = jax.jit(net.apply).lower(params, x).compile()
    step(params, x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            step(params, x).block_until_ready()
    times, instrs = profile.op_times(tmp_path), profile.hlo_instructions(step.as_text())
    assert times and set(times) <= set(instrs)  # every timed op is an instruction of this module
    names = {profile.split_op_name(instrs[k]["op_name"])[0][-1] for k in times if instrs[k]["op_name"]}
    assert {"conv_a", "proj"} <= names
    text = profile.report(times, instrs, steps=2, top=5, depth=1)
    assert "conv_general_dilated" in text and "dot_general" in text
    assert profile.split_op_name("jit(f)/UNet2DConditionModel/mid_block/conv/conv_general_dilated") == (
        ["UNet2DConditionModel", "mid_block", "conv"], "conv_general_dilated")  # fmt: skip


def test_flax_venv_is_not_built_without_asking(tmp_path):
    """``bench`` with the Flax contender and no venv yet refuses (non-interactive) and names the size and --yes."""
    env = {**os.environ, "SD_JAX_BENCH_FLAX_VENV": str(tmp_path / "venv")}
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "a", "--out", str(tmp_path / "r.md")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "1.9 GB" in r.stderr and "--yes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "r.md").exists()


def test_gpu_plan_covers_the_issue_rows_and_dry_run_is_tiny():
    from bench import gpu, models

    full = Settings(quick=False, repeats=1, contenders=(OURS, TORCH), gpu=True)
    rows = gpu.plan(full)
    assert [(m.name, s, n, b) for m, s, n, b in rows] == [
        ("sd15", "euler", 50, 1), ("sd15", "euler", 50, 8), ("sd15", "dpmpp_2m", 20, 1), ("sd15", "dpmpp_2m", 20, 8),
        ("sdxl", "euler", 30, 1)]  # fmt: skip
    dry = Settings(quick=False, repeats=1, contenders=(OURS, TORCH), gpu=True, dry_run=True)
    assert {m.name for m, *_ in gpu.plan(dry)} == {"tiny", "tiny_xl"}
    spec = gpu.specs(dry, models.TINY_XL, "euler", 2, 1)
    assert spec[TORCH]["device"] == "cpu" and spec[OURS]["folder"].endswith("fixtures/sdxl")


@pytest.mark.slow
def test_gpu_mode_dry_run_on_cpu(tmp_path):
    """``python -m bench --gpu --dry-run``: the GPU mode's code end to end with tiny models (ours and diffusers)."""
    out = tmp_path / "GPU.md"
    cmd = [sys.executable, "-m", "bench", "--gpu", "--dry-run", "--repeats", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "mode: GPU dry run (tiny models)" in text
    for label in ("tiny 32², euler, 2 steps, batch 2", "tiny 32², dpmpp_2m, 2 steps, batch 1",
                  "tiny_xl 64², euler, 2 steps, batch 1"):  # fmt: skip
        cells = _row(text, label)
        assert float(cells[1].split()[0]) > 0 and float(cells[2].split()[0]) > 0, cells  # ours and torch timed
    cells = _row(text, "cpu")  # the utilisation row: FLOPs, step time, achieved and matmul TFLOP/s
    assert all(float(c.split()[0]) > 0 for c in cells[1:5]), cells
