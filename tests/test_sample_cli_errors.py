"""sample.py's bad input, as a new user meets it: one line ``error: ...`` naming the value and what to do, exit
status 2 for usage and 1 for runtime, no traceback, and nothing written. Each row failed differently before
(a traceback, a crash, a wrong image or a misleading message); see the comment at its end."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from sd_jax.cli.sample import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(d / "photo.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "mask16.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(d / "small.png")
    (d / "bad.png").write_bytes(b"not a png")
    (d / "a_file").write_text("x")
    (d / "lora.safetensors").write_bytes(b"")  # only its existence matters: the scale is checked first
    (d / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")  # an empty pickled dict
    return d


# argv (FIXTURE/ = the repo's tests/fixtures, FILES/ = the files above, OUT = the output dir), exit status,
# words the one error line must contain.
CASES = [
    (["--steps", "0"], 2, ["--steps", "0 is outside [1, 1000]"]),  # ZeroDivisionError
    (["--steps", "1000000000"], 2, ["--steps", "outside [1, 1000]"]),  # 7.45 GiB allocation
    (["--steps", "-1"], 2, ["--steps", "outside"]),  # accepted
    (["--seed", str(2**70)], 2, ["--seed", "outside [-1, 4294967295]"]),  # OverflowError
    (["--num-images", "0"], 2, ["--num-images", "outside"]),  # IndexError
    (["--num-images", "-1"], 2, ["--num-images", "outside"]),  # IndexError
    (["--batch-size", "0"], 2, ["--batch-size"]),
    (["--guidance-scale", "nan"], 2, ["--guidance-scale", "'nan' is not a finite number"]),  # black images
    (["--guidance-scale", "inf"], 2, ["--guidance-scale", "not a finite number"]),  # garbage images
    (["--guidance-rescale", "2"], 2, ["--guidance-rescale", "outside [0.0, 1.0]"]),
    (["--lora", "FILES/lora.safetensors:nan"], 2, ["scale 'nan' is not a finite number"]),  # garbage images
    (["--lora", "FILES/lora.safetensors:abc"], 2, ["scale 'abc' is not a number"]),  # 'abc' taken as the file name
    (["--lora", "FILES/none.safetensors:0.5"], 2, ["none.safetensors: no such file"]),
    (["--output-dir", "FILES/a_file"], 2, ["--output-dir", "is a file"]),  # failed after sampling
    (["--output-dir", "FILES/a_file/sub"], 2, ["--output-dir", "which is a file"]),  # failed after sampling
    (["--save-steps", "0,7"], 2, ["--save-steps [7] outside [0, 3)"]),  # failed after sampling
    (["--save-steps", "a"], 2, ["--save-steps", "whole numbers"]),  # ValueError traceback after sampling
    (["--save-steps", "0", "--init-image", "FILES/photo.png"], 2, ["--save-steps works with txt2img only"]),
    (["--model", "FIXTURE/sd1/model_index.json"], 2, ["pass the folder", "fixtures/sd1"]),  # "pickle needs torch"
    (["--model", "FIXTURE/nothing"], 2, ["no such file or folder"]),
    (["--model", "FIXTURE"], 2, ["without model_index.json"]),
    (["--model", "FILES/model.ckpt"], 2, ["allow_pickle=True", "--allow-pickle"]),
    (["--config-dir", "FIXTURE/sd1"], 2, ["--config-dir applies to single-file checkpoints only"]),
    (["--model", "FIXTURE/single_file/sd1.safetensors"], 1, ["shipped sd15 configs", "--config-dir"]),  # misleading
    (["--height", "100000", "--width", "100000"], 2, ["estimated peak memory", "GiB", "--max-memory-gb"]),  # abort
    (["--height", "64", "--max-memory-gb", "0.000001"], 2, ["exceeds --max-memory-gb"]),
    (["--height", "36"], 2, ["--height must be a positive multiple of 8"]),
    (["--height", "0"], 2, ["--height", "outside"]),
    (["--sampler", "nope"], 2, ["--sampler", "invalid choice: 'nope'"]),
    (["--schedule", "nope"], 2, ["--schedule", "invalid choice"]),
    (["--clip-skip", "0"], 2, ["--clip-skip", "outside"]),
    (["--strength", "1.5"], 2, ["--strength", "outside [0.0, 1.0]"]),
    (["--no-such-flag"], 2, ["unrecognized arguments: --no-such-flag"]),
    (["--init-image", "FILES/missing.png"], 2, ["--init-image", "no such file"]),
    (["--init-image", "FILES/bad.png"], 2, ["--init-image", "not a readable image"]),
    (
        ["--init-image", "FILES/photo.png", "--mask-image", "FILES/mask16.png"],
        2,
        ["--mask-image is 16x16 but --init-image is 32x32"],
    ),  # fmt: skip
    (["--mask-image", "FILES/mask16.png"], 2, ["--mask-image needs --init-image"]),
    (["--upscale", "--init-image", "FILES/small.png", "--height", "64"], 2, ["do not apply to --upscale"]),
    (["--upscale", "--init-image", "FILES/small.png"], 2, ["needs an x4 upscaler model"]),  # after loading
    (["--prompts-file", "FILES/none.txt"], 2, ["--prompts-file", "no such file"]),
    (["--num-images", "1000000000"], 2, ["more than 100000 images"]),  # a 1e9-entry prompt list
    (["--denoise", "--upscale", "--init-image", "FILES/small.png"], 2, ["--upscale and --denoise are different"]),
    (["--interpolate", "--init-image", "FILES/small.png"], 2, ["--interpolate starts from noise"]),
    (["--micro-batch", "3", "--batch-size", "4"], 2, ["not a multiple of --micro-batch 3"]),
    (
        ["--model", "FIXTURE/upscale", "--upscale", "--init-image", "FILES/small.png", "--noise-level", "999"],
        1,
        ["noise_level 999 exceeds"],
    ),  # fmt: skip # the pipeline's ValueError, as one line
]


def _argv(args, fixtures_dir, files, out):
    sub = lambda a: a.replace("FIXTURE", str(fixtures_dir)).replace("FILES", str(files))  # noqa: E731
    argv = [sub(a) for a in args]
    base = [] if "--model" in argv else ["--model", str(fixtures_dir / "sd1")]
    base += [] if "--output-dir" in argv else ["--output-dir", str(out)]
    base += [] if any(a.startswith("--prompt") for a in argv) else ["--prompt", "a cat"]
    return [*base, "--steps", "3", *argv] if "--steps" not in argv else [*base, *argv]


def _expect_one_line(capsys, argv, code, words, out):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert e.value.code == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), "nothing may be written"


@pytest.mark.parametrize("args,code,words", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line(args, code, words, fixtures_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_one_line(capsys, _argv(args, fixtures_dir, files, out), code, words, out)


def test_read_only_output_dir(fixtures_dir, files, tmp_path, capsys, monkeypatch):
    """A folder the user cannot write to (root can write anywhere, so access is denied by patching)."""
    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out) else real(p, mode))
    _expect_one_line(capsys, _argv(["--output-dir", str(out)], fixtures_dir, files, out), 2,
                     ["--output-dir", "is not writable"], out)  # fmt: skip


def test_allow_pickle_without_torch(fixtures_dir, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    argv = _argv(["--model", str(files / "model.ckpt"), "--allow-pickle"], fixtures_dir, files, tmp_path / "out")
    _expect_one_line(capsys, argv, 1, ["needs torch, which is not installed", "pip install torch"], tmp_path / "out")


def test_debug_shows_the_traceback(fixtures_dir, files, tmp_path):
    from sd_jax.cli.sample_args import UsageError

    with pytest.raises(UsageError, match="is a file"):
        main(_argv(["--output-dir", str(files / "a_file"), "--debug"], fixtures_dir, files, tmp_path))


def test_help_shows_defaults_choices_and_help_for_every_flag(capsys):
    from sd_jax.cli.sample_args import build_parser
    from sd_jax.sampling.registry import SAMPLERS

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert (
        "-1: a random seed (default: 0)" in text
        and "(default: 20)" in text
        and "(default: 7.5)" in text
        and "(default: resize)" in text
    )
    assert len(SAMPLERS) == 12 and all(name in text for name in SAMPLERS)
    assert "{default,karras,exponential,beta,sgm_uniform,simple}" in text and "{auto,on,off}" in text
    missing = [a.option_strings for a in build_parser()._actions if not a.help]
    assert not missing, f"flags without help: {missing}"
