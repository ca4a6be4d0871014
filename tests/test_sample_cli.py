"""sample.py end to end on the fixtures: every mode writes PNGs with metadata; bad input is one clear line."""

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from sd_jax.cli.sample import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    Image.fromarray(data.astronaut()).resize((32, 32), Image.LANCZOS).save(d / "photo.png")
    Image.fromarray(data.coffee()).resize((16, 16), Image.LANCZOS).save(d / "small.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:16, :16]).save(d / "mask16.png")
    noisy = np.clip(
        np.asarray(Image.open(d / "photo.png"), np.float32) + np.random.default_rng(0).normal(0, 25, (32, 32, 3)),
        0,
        255,
    )
    Image.fromarray(noisy.astype(np.uint8)).save(d / "noisy.png")
    (d / "bad.png").write_bytes(b"not a png")
    (d / "prompts.txt").write_text("a red circle\n\na blue square\n")
    return d


def run(fixtures_dir, tmp_path, *args, model="sd1"):
    out = tmp_path / "out"
    main(["--model", str(fixtures_dir / model), "--steps", "3", "--output-dir", str(out), *args])
    return out


def meta(path):
    return json.loads(Image.open(path).text["parameters"])


def test_txt2img_batch_with_metadata_and_grid(fixtures_dir, tmp_path, images):
    out = run(fixtures_dir, tmp_path, "--prompts-file", str(images / "prompts.txt"), "--num-images", "2",
              "--negative-prompt", "blurry", "--seed", "5", "--save-steps", "0,2")  # fmt: skip
    pngs = sorted(out.glob("txt2img_5_0*.png"))
    assert len(pngs) == 4 and (out / "txt2img_5_grid.png").exists() and (out / "progression_5.png").exists()
    m = meta(pngs[2])
    assert m["prompt"] == "a blue square" and m["seed"] == 5 and m["negative_prompt"] == "blurry"
    assert m["sampler"] == "euler" and m["steps"] == 3 and m["model"].endswith("sd1")


@pytest.mark.parametrize(
    "mode,args,model",
    [
        ("img2img", ["--init-image", "photo.png", "--strength", "0.5"], "sd1"),
        ("inpaint", ["--init-image", "photo.png", "--mask-image", "mask.png"], "inpaint"),
        ("inpaint", ["--init-image", "photo.png", "--mask-image", "mask.png"], "sd1"),
        ("denoise", ["--init-image", "noisy.png", "--denoise"], "sd1"),
        ("upscale", ["--init-image", "small.png", "--upscale"], "upscale"),
    ],
)
def test_image_modes(mode, args, model, fixtures_dir, tmp_path, images):
    args = [str(images / a) if a.endswith(".png") else a for a in args]
    out = run(fixtures_dir, tmp_path, "--prompt", "a cat", *args, model=model)
    (png,) = out.glob(f"{mode}_0_0000.png")
    size = 64 if mode == "upscale" else 32
    assert Image.open(png).size == (size, size) and meta(png)["mode"] == mode


def test_interpolation_gif(fixtures_dir, tmp_path):
    out = run(fixtures_dir, tmp_path, "--prompt", "a cat", "--interpolate", "a dog", "--frames", "3")
    gif = Image.open(out / "interpolate_0.gif")
    assert gif.n_frames == 3 and len(list(out.glob("interpolate_0_0*.png"))) == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--init-image", "missing.png"], "no such file"),
        (["--init-image", "bad.png"], "not a readable image"),
        (
            ["--init-image", "photo.png", "--mask-image", "mask16.png"],
            "--mask-image is 16x16 but --init-image is 32x32",
        ),
        (["--init-image", "photo.png", "--strength", "1.5"], "--strength must be in [0, 1]"),
        (["--sampler", "nope"], "unknown --sampler 'nope'"),
        (["--height", "36"], "--height must be a positive multiple of 8"),
    ],
)
def test_bad_input_is_one_line(args, message, fixtures_dir, tmp_path, images, capsys):
    args = [str(images / a) if a.endswith(".png") else a for a in args]
    with pytest.raises(SystemExit) as e:
        run(fixtures_dir, tmp_path, "--prompt", "a cat", *args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err and "Traceback" not in err


def test_missing_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nothing"), "--prompt", "x"])
    assert "no such file or folder" in capsys.readouterr().err
