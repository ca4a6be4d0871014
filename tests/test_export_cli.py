"""python -m sd_jax.export as a new user meets it: bad outputs and architectures are one line with exit status 2,
nothing is half-written, and the shipped tiny single files need (and say they need) --config-dir."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FX = ROOT / "tests" / "fixtures"


def run_export(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "sd_jax.export", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def unwritable(tmp_path):
    if os.geteuid() == 0:  # root ignores folder modes
        return "/sys/sd_jax_export"
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro / "out")


CASES = [
    # (name, args (T/: the test's tmp folder), exit status, words in the one-line error)
    ("output is a file", ["--model", FX / "sd1", "--out", "T/a_file"], 2, ["is a file", "writes a folder"]),
    ("output under a file", ["--model", FX / "sd1", "--out", "T/a_file/sub"], 2, ["a_file is a file"]),
    ("read-only output", ["--model", FX / "sd1", "--out", "RO"], 2, ["cannot write in"]),
    ("single file into a folder", ["--model", FX / "sd1", "--out", "T", "--single-file", "sd1"], 2, ["is a folder"]),
    ("another architecture's layout", ["--model", FX / "sd1", "--out", "T/x.safetensors", "--single-file", "sdxl"],
     2, ["the model is sd1", "sdxl was asked for", "--single-file sd1"]),
    ("unknown architecture", ["--model", FX / "sd1", "--out", "T/x.safetensors", "--single-file", "sd3"], 2,
     ["invalid choice: 'sd3'"]),
    ("tiny single file without --config-dir", ["--model", FX / "single_file" / "sd1.safetensors", "--out", "T/o"],
     1, ["do not fit the shipped", "--config-dir"]),
    ("missing --config-dir", ["--model", FX / "single_file" / "sd1.safetensors", "--out", "T/o", "--config-dir",
                              "T/none"], 2, ["--config-dir", "no such folder"]),
    ("missing model", ["--model", "T/no_model", "--out", "T/o"], 2, ["no_model", "no such file or folder"]),
]  # fmt: skip


@pytest.mark.parametrize("name,args,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_export_is_one_line(name, args, code, words, tmp_path):
    (tmp_path / "a_file").write_text("x")
    args = [unwritable(tmp_path) if a == "RO" else str(a).replace("T/", f"{tmp_path}/") for a in args]
    args = [str(tmp_path) if a == "T" else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_export(*args)
    print(name, r.returncode, r.stderr)
    assert r.returncode == code
    assert "Traceback" not in r.stderr + r.stdout
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], w
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing (half-)written


def test_tiny_single_file_exports_with_config_dir_and_reloads(tmp_path):
    from sd_jax.loading.diffusers import load_checkpoint

    r = run_export("--model", FX / "single_file" / "sd1.safetensors", "--out", tmp_path / "out", "--config-dir",
                   FX / "sd1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # the temporary folder was moved into place
    ckpt = load_checkpoint(tmp_path / "out")
    assert set(ckpt.models) >= {"unet", "vae", "text_encoder"}


def test_architecture_of_names_every_fixture():
    import json

    from sd_jax.convert.single_file import architecture_of

    def configs(name):
        return {c: json.loads((FX / name / c / "config.json").read_text()) for c in
                ("unet", "vae", "text_encoder", "text_encoder_2") if (FX / name / c).is_dir()}  # fmt: skip

    got = {n: architecture_of(configs(n)) for n in ("sd1", "sd2", "sdxl", "inpaint", "upscale")}
    assert got == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "inpaint": "sd1_inpaint", "upscale": "x4_upscaler"}
