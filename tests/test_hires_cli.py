"""sample.py --hires-*: the embedded model end to end (the PNG is pipe.hires_fix's image, with A1111's fields), and
bad input refused in one line before any model loads."""

import json

import numpy as np
import pytest
from PIL import Image

from sd_jax.cli import sample
from sd_jax.cli.sample import main
from sd_jax.embedded import default_model_path

MODEL = default_model_path()
needs_model = pytest.mark.skipif(MODEL is None, reason="the embedded model is not in this checkout")
PROMPT = "a red circle on a blue background"


@needs_model
def test_hires_run_writes_the_libraries_image_with_a1111_fields(tmp_path):
    from sd_jax.pipelines import images
    from sd_jax.pipelines.pipeline import StableDiffusion

    main(["--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32", "--seed", "4", "--hires-scale", "2",
          "--hires-steps", "3", "--hires-denoise", "0.5", "--output-dir", str(tmp_path)])  # fmt: skip
    (png,) = sorted(tmp_path.glob("*.png"))
    img = Image.open(png)
    assert img.size == (64, 64)
    text = img.text["parameters"]
    try:
        fields = json.loads(text)["infotext"]
    except (ValueError, KeyError):  # infotext written as A1111's text
        fields = dict(kv.split(": ", 1) for kv in text.splitlines()[-1].split(", "))
    assert {k: str(v) for k, v in fields.items() if k.startswith(("Hires", "Denoising"))} == {
        "Hires upscale": "2", "Hires steps": "3", "Hires upscaler": "Latent", "Denoising strength": "0.5"}  # fmt: skip
    pipe = StableDiffusion.load(MODEL)
    want, _ = pipe.hires_fix([PROMPT], height=32, width=32, steps=2, seed=4, scale=2, hires_steps=3, denoise=0.5)
    np.testing.assert_array_equal(np.asarray(img.convert("RGB")), images.to_uint8(want)[0])


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--hires-scale", "1.3"],
            "--hires-scale 1.3 turns 32x32 into 41.6x41.6, not multiples of 8 ; use "
            "--hires-scale 1.25 (40x40) or 1.5 (48x48)",
        ),  # fmt: skip
        (["--hires-width", "60"], "--hires-width 60 must be a positive multiple of 8 ; e.g. 56"),
        (["--hires-steps", "5"], "--hires-steps needs --hires-scale"),
        (["--hires-scale", "2", "--hires-width", "64"], "both set the hires size"),
        (["--hires-scale", "2", "--hires-denoise", "0"], "--hires-denoise 0 leaves nothing"),
        (["--hires-scale", "2", "--hires-steps", "20", "--hires-denoise", "0.01"], "walks a 2000-step grid"),
        (["--hires-scale", "2", "--save-steps", "0"], "--save-steps does not apply to the hires fix"),
        (["--hires-scale", "2", "--interpolate"], "txt2img only (as A1111's) ; drop --interpolate"),
        (["--hires-scale", "2", "--refiner", "x"], "--refiner with the hires fix is not supported yet"),
        (
            ["--hires-width", "1024", "--hires-height", "1024", "--max-memory-gb", "0.1"],
            "the hires fix's 1024x1024 second pass, batch 1: estimated peak memory",
        ),  # fmt: skip
    ],
)
@needs_model
def test_bad_hires_flags_are_one_line_before_loading(args, words, tmp_path, capsys, monkeypatch):
    def no_load(*_):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(sample, "load_pipeline", no_load)
    with pytest.raises(SystemExit) as e:
        main(["--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32", "--output-dir", str(tmp_path),
              *args])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_the_progress_bar_counts_both_passes():
    from sd_jax.cli.sample_hires import both_passes

    got = []
    report = both_passes(lambda step, total: got.append((step, total)), 3, 2)
    for step, total in [(1, 3), (2, 3), (3, 3), (1, 2), (2, 2)]:  # the first pass's 3 steps, the second's 2
        report(step, total)
    assert got == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


@needs_model
def test_from_image_reproduces_a_hires_image(tmp_path):
    main(["--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32", "--seed", "7", "--hires-scale", "2",
          "--hires-steps", "3", "--hires-denoise", "0.6", "--hires-upscaler", "latent-nearest",
          "--output-dir", str(tmp_path / "a")])  # fmt: skip
    (first,) = sorted((tmp_path / "a").glob("*.png"))
    assert "Hires upscaler: Latent (nearest)" in Image.open(first).text["parameters"]
    main(["--from-image", str(first), "--output-dir", str(tmp_path / "b")])
    (again,) = sorted((tmp_path / "b").glob("*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert Image.open(again).size == (64, 64)
