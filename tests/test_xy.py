"""sample.py --xy: axes and A1111-style value lists checked before any model loads; one labelled grid plus each
cell with its own infotext; cells sharing a static configuration share one compiled loop."""

import numpy as np
import pytest
from PIL import Image

from sd_jax import infotext as it
from sd_jax.cli import sample_xy
from sd_jax.cli.sample import main
from sd_jax.cli.sample_args import UsageError
from sd_jax.pipelines import pipeline
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.pnginfo import read_parameters


def test_axis_values_and_ranges_as_a1111():
    assert sample_xy.parse_axis("steps=10-30 (+10)").values == (10, 20, 30)
    assert sample_xy.parse_axis("steps=1-3, 8").values == (1, 2, 3, 8)
    assert sample_xy.parse_axis("cfg=3-11 [5]").values == (3.0, 5.0, 7.0, 9.0, 11.0)
    assert sample_xy.parse_axis("guidance=7.5-6.5 (-0.5)").values == (7.5, 7.0, 6.5)
    assert sample_xy.parse_axis("seed=5-3").values == (5, 4, 3)
    assert sample_xy.parse_axis("sampler=Euler a, dpmpp_2m, DPM++ 2M Karras").values == (
        "euler_a", "dpmpp_2m", "dpmpp_2m_karras")  # fmt: skip
    assert sample_xy.parse_axis("schedule=Karras,default,SGM Uniform").values == ("karras", "default", "sgm_uniform")
    a = sample_xy.parse_axis('prompt=red,"dark, blue"')
    assert a.values == ("red", "dark, blue") and a.caption("dark, blue") == "dark, blue"
    assert sample_xy.parse_axis("cfg=7").caption(7.0) == "CFG Scale: 7"


@pytest.mark.parametrize(("spec", "words"), [
    ("colour=1,2", "with AXIS one of steps, guidance, cfg"),
    ("steps", "write AXIS=V1,V2"),
    ("steps=10,abc", "'abc' is not a whole number or a range"),
    ("steps=0,10", "steps 0 outside [1, 1000]"),
    ("steps=30-10 (+10)", "never reaches its end"),
    ("guidance=1,nan", "nan is not a finite number"),
    ("sampler=euler,DPM2 a", "'DPM2 a' is an A1111 sampler sd-jax does not have"),
    ("schedule=karras,Align Your Steps", "A1111 schedule type sd-jax does not have"),
    ("seed=", "no values"),
])  # fmt: skip
def test_bad_axes_are_one_line_usage_errors_before_loading(spec, words, fixtures_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(StableDiffusion, "load", classmethod(lambda *a, **k: pytest.fail("the model loaded")))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(fixtures_dir / "sd1"), "--prompt", "a red cat", "--output-dir", str(tmp_path / "o"),
              "--xy", spec])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("extra", "words"), [
    (["--xy", "steps=1,2", "--xy", "cfg=1,2", "--xy", "seed=1,2"], "an X/Y grid has one or two axes"),
    (["--xy", "cfg=1,2", "--xy", "guidance=3"], "set the same thing"),
    (["--xy", "prompt=dog,cat"], "'dog' occurs in neither the prompt"),
    (["--xy", "steps=1,2", "--prompt", "b"], "--xy takes one --prompt"),
    (["--xy", "strength=0.5,1"], "varies img2img's --strength"),
    (["--xy", "steps=1,2", "--num-images", "2"], "drop --num-images"),
])  # fmt: skip
def test_bad_combinations(extra, words, fixtures_dir, tmp_path, capsys):
    with pytest.raises(UsageError, match=words):
        from sd_jax.cli.sample import run

        run(["--model", str(fixtures_dir / "sd1"), "--prompt", "a red cat", "--output-dir", str(tmp_path), *extra])


def test_grid_cells_metadata_and_compiled_loop_reuse(fixtures_dir, tmp_path, monkeypatch):
    builds = []
    real = pipeline.build_loop
    monkeypatch.setattr(pipeline, "build_loop", lambda *a: builds.append(a[2]) or real(*a))
    loads = []
    real_load = StableDiffusion.load.__func__
    monkeypatch.setattr(StableDiffusion, "load", classmethod(lambda cls, *a, **k: loads.append(1) or
                                                             real_load(cls, *a, **k)))  # fmt: skip
    out = tmp_path / "o"
    main(["--model", str(fixtures_dir / "sd1"), "--prompt", "a red cat", "--negative-prompt", "red blur",
          "--seed", "4", "--output-dir", str(out), "--xy", "prompt=red,blue", "--xy", "steps=1,2"])  # fmt: skip
    assert len(loads) == 1 and sorted(o.steps for o in builds) == [1, 2]  # 4 cells, one compile per step count
    cells = sorted(out.glob("0000[0-3]-4.png"))
    assert len(cells) == 4
    f = [it.parse_infotext(read_parameters(p)) for p in cells]
    assert [(x["Prompt"], x["Negative prompt"], x["Steps"]) for x in f] == [
        ("a red cat", "red blur", "1"), ("a blue cat", "blue blur", "1"),
        ("a red cat", "red blur", "2"), ("a blue cat", "blue blur", "2")]  # fmt: skip
    grid_path = out / "00000-xy_grid.png"
    g = it.parse_infotext(read_parameters(grid_path))
    assert (g["Script"], g["X Type"], g["X Values"], g["Y Type"], g["Y Values"]) == (
        "X/Y/Z plot", "Prompt S/R", "red,blue", "Steps", "1,2")  # fmt: skip
    grid = np.asarray(Image.open(grid_path))
    imgs = [np.asarray(Image.open(p)) for p in cells]
    h, w = imgs[0].shape[:2]
    top, left = grid.shape[0] - 2 * h, grid.shape[1] - 2 * w
    assert top > 0 and left > 0  # room for the labels
    for k, img in enumerate(imgs):  # cells in row-major order: x = prompt, y = steps
        r, c = divmod(k, 2)
        assert np.array_equal(grid[top + r * h : top + (r + 1) * h, left + c * w : left + (c + 1) * w], img)
    assert (grid[:top, left:] < 128).any() and (grid[top:, :left] < 128).any()  # text drawn in both margins
    assert not np.array_equal(imgs[0], imgs[1])  # the prompt changed the image
