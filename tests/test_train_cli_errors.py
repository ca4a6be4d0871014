"""train.py as a new user meets it: every bad input is one line naming the value, with exit status 2 (usage) and
no traceback, refused before any model loads and without creating the workdir; --help and --show-config."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
DREAMBOOTH = str(ROOT / "configs" / "dreambooth.py") + ":runlocal"


def run_train(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    for name in ("a.png", "b.jpg"):
        (root / "corrupt" / name).write_bytes(b"not an image")
    (root / "good").mkdir()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "good" / "dog.png")
    (root / "a_file").write_text("x")
    return root


def unwritable(root):
    """A folder this process cannot write in: a read-only one, or (as root, which ignores modes) under /sys."""
    if os.geteuid() == 0:
        return "/sys/sd_jax_workdir"
    ro = root / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return str(ro / "run")


CASES = [
    # (name, args (W: the workdir, F: the test folders), exit status, words in the one-line error)
    ("missing config file", ["--config", "configs/nope.py", "--workdir", "W"], 2, ["--config configs/nope.py",
                                                                                "no such file"]),
    ("unknown top-level key", ["--config", TINY, "--workdir", "W", "--config.foo=1"], 2, ["--config.foo",
                                                                                       "unknown config key"]),
    ("unknown nested key", ["--config", TINY, "--workdir", "W", "--config.data.sorce=x"], 2, ["data.sorce",
                                                                                           "did you mean data.source"]),
    ("value of the wrong type", ["--config", TINY, "--workdir", "W", "--config.batch_size=abc"], 2,
     ["batch_size='abc'", "whole number"]),
    ("batch_size 0", ["--config", TINY, "--workdir", "W", "--config.batch_size=0"], 2, ["batch_size=0", ">= 1"]),
    ("steps 0", ["--config", TINY, "--workdir", "W", "--config.steps=0"], 2, ["steps=0", ">= 1"]),
    ("empty data folder", ["--config", TINY, "--workdir", "W", "--config.data.source=folder",
                           "--config.data.path=F/empty"], 2, ["data.path", "no images"]),
    ("only corrupt images", ["--config", TINY, "--workdir", "W", "--config.data.source=folder",
                             "--config.data.path=F/corrupt"], 2, ["none of its 2 image file(s) can be read"]),
    ("missing data folder", ["--config", TINY, "--workdir", "W", "--config.data.source=folder",
                             "--config.data.path=F/missing"], 2, ["data.path", "no such folder"]),
    ("empty data.path", ["--config", TINY, "--workdir", "W", "--config.data.source=folder", "--config.data.path="],
     2, ["data.path is empty"]),
    ("missing init_from", ["--config", TINY, "--workdir", "W", "--config.init_from=F/no_model"], 2,
     ["init_from=", "no such file or folder"]),
    ("bad U-Net config", ["--config", TINY, "--workdir", "W", "--config.model.unet.block_out_channels=(32,)"], 2,
     ["model.unet", "block_out_channels differ in length"]),
    ("unknown U-Net field", ["--config", TINY, "--workdir", "W", "--config.model.unet.chanels=3"], 2,
     ["model.unet.chanels", "unknown config key"]),
    ("unknown component in train", ["--config", TINY, "--workdir", "W", "--config.train=foo"], 2, ["train=('foo',)"]),
    ("read-only workdir", ["--config", TINY, "--workdir", "RO"], 2, ["--workdir", "cannot write there"]),
    ("workdir is a file", ["--config", TINY, "--workdir", "F/a_file"], 2, ["--workdir", "not a folder"]),
    ("export with no checkpoint", ["--config", TINY, "--workdir", "F", "--export", "F/out"], 2,
     ["no checkpoint to export yet"]),
    ("DreamBooth prior preservation without class_path", ["--config", DREAMBOOTH, "--workdir", "W",
                                                          "--config.data.path=F/good"], 2, ["data.class_path"]),
    ("no workdir", ["--config", TINY], 2, ["--workdir", "required"]),
    ("no config", ["--workdir", "W"], 2, ["--config FILE is required"]),
    ("unknown flag", ["--config", TINY, "--workdir", "W", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
]  # fmt: skip


@pytest.mark.parametrize("name,args,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(name, args, code, words, folders, tmp_path):
    workdir = tmp_path / "run"
    subst = {"W": str(workdir), "RO": unwritable(folders)}
    args = [subst.get(a, a).replace("F/", f"{folders}/") if a != "F" else str(folders) for a in args]
    r = run_train(*args, cwd=ROOT)
    print(name, r.returncode, r.stderr)
    assert r.returncode == code
    assert "Traceback" not in r.stderr + r.stdout
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], w
    assert not workdir.exists()  # refused before anything was written


def test_debug_shows_the_traceback(tmp_path):
    r = run_train("--config", TINY, "--workdir", str(tmp_path / "w"), "--config.steps=0", "--debug", cwd=ROOT)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_help_shows_flags_and_config_keys():
    r = run_train("--help", cwd=ROOT)
    assert r.returncode == 0
    for flag in ("--config", "--workdir", "--show-config", "--export", "--debug", "exit status"):
        assert flag in r.stdout, flag
    r = run_train("--config", TINY, "--help", cwd=ROOT)
    assert r.returncode == 0 and "optim.lr = 0.001" in r.stdout and "data.source = 'synthetic'" in r.stdout


def test_show_config_prints_the_resolved_config():
    r = run_train("--config", TINY, "--show-config", "--config.optim.lr=3e-4", "--config.init_from=/data/sd15",
                  "--config.train=unet,text_encoder", "--config.model.unet.block_out_channels=(16, 32)",
                  "--config.progress_bar=false", cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    for line in ("optim.lr = 0.0003", "init_from = '/data/sd15'", "train = ('unet', 'text_encoder')",
                 "model.unet.block_out_channels = (16, 32)", "progress_bar = False",
                 "optim.steps = 20"):  # fmt: skip
        assert line in out, line
