"""sample.py --refiner: the tiny SDXL base and refiner end to end (the PNG is pipelines.refiner.refine's image, with
A1111's Refiner fields), and a wrong refiner or base refused in one line before any model loads."""

import json

import numpy as np
import pytest
from PIL import Image

from sd_jax.cli import sample
from sd_jax.cli.sample import main

PROMPT = "a red circle on a blue background"


@pytest.fixture
def paths(fixtures_dir):
    return {"base": str(fixtures_dir / "sdxl"), "refiner": str(fixtures_dir / "sdxl_refiner"),
            "sd1": str(fixtures_dir / "sd1"), "file": str(fixtures_dir / "single_file" / "sdxl_refiner.safetensors"),
            "sd1_file": str(fixtures_dir / "single_file" / "sd1.safetensors")}  # fmt: skip


def _fields(img) -> dict:
    text = img.text["parameters"]
    try:
        return json.loads(text)["infotext"]
    except (ValueError, KeyError):  # infotext written as A1111's text
        return dict(kv.split(": ", 1) for kv in text.splitlines()[-1].split(", "))


@pytest.mark.slow  # ~2 min; tests/test_sdxl_refiner.py covers the handoff in the default run
def test_refiner_run_writes_the_handoffs_image(paths, tmp_path):
    from sd_jax.pipelines import images
    from sd_jax.pipelines.pipeline import StableDiffusion
    from sd_jax.pipelines.refiner import refine

    main(["--model", paths["base"], "--refiner", paths["refiner"], "--refiner-start", "0.7", "--prompt", PROMPT,
          "--steps", "4", "--height", "32", "--width", "32", "--seed", "3", "--sampler", "euler",
          "--guidance-scale", "5", "--output-dir", str(tmp_path)])  # fmt: skip
    (png,) = sorted(tmp_path.glob("*.png"))
    img = Image.open(png)
    fields = {k: str(v) for k, v in _fields(img).items() if k.startswith("Refiner")}
    from sd_jax import hashing

    assert fields == {"Refiner": f"sdxl_refiner [{hashing.model_hash(paths['refiner'])}]", "Refiner switch at": "0.7"}
    base, ref = StableDiffusion.load(paths["base"]), StableDiffusion.load(paths["refiner"])
    want = refine(base, ref, [PROMPT], switch=0.7, steps=4, height=32, width=32, seed=3, sampler="euler",
                  guidance_scale=5.0)  # fmt: skip
    plain, _ = base.txt2img([PROMPT], steps=4, height=32, width=32, seed=3, sampler="euler", guidance_scale=5.0)
    np.testing.assert_array_equal(np.asarray(img.convert("RGB")), images.to_uint8(want)[0])
    assert np.abs(images.to_uint8(plain)[0].astype(int) - np.asarray(img.convert("RGB"))).max() > 2


@pytest.mark.parametrize(
    "model, args, words",
    [
        ("base", ["--refiner", "sd1"], "sd1 is not SDXL (StableDiffusionPipeline), not an SDXL refiner"),
        ("base", ["--refiner", "base"], "sdxl is an SDXL base model, not an SDXL refiner"),
        ("base", ["--refiner", "sd1_file"], "sd1.safetensors is not SDXL (sd1), not an SDXL refiner"),
        ("sd1", ["--refiner", "refiner"], "continues an SDXL base model, but"),
        ("sd1", ["--refiner", "file"], "is not SDXL (StableDiffusionPipeline) ; pass an SDXL base"),
        ("base", ["--refiner", "refiner", "--refiner-start", "1"], "--refiner-start 1 leaves one model nothing"),
        ("base", ["--refiner-start", "0.5"], "--refiner-start needs --refiner PATH"),
        ("base", ["--aesthetic-score", "7"], "--aesthetic-score needs --refiner PATH"),
        ("base", ["--refiner", "refiner", "--save-steps", "0"], "drop --save-steps or --refiner"),
        ("base", ["--refiner", "/nonexistent/refiner.safetensors"], "no such file or folder"),
    ],
)
def test_bad_refiner_is_one_line_before_loading(model, args, words, paths, tmp_path, capsys, monkeypatch):
    def no_load(*_):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(sample, "load_pipeline", no_load)
    args = [paths.get(a, a) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["--model", paths[model], "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32",
              "--output-dir", str(tmp_path), *args])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not list(tmp_path.glob("*.png"))


def test_loaded_pair_is_checked(paths):
    from sd_jax.pipelines.pipeline import StableDiffusion
    from sd_jax.pipelines.refiner import RefinerError, check_pair

    base, ref = StableDiffusion.load(paths["base"]), StableDiffusion.load(paths["refiner"])
    check_pair(base, ref)
    with pytest.raises(RefinerError, match="the refiner is an SDXL base model, not an SDXL refiner"):
        check_pair(base, base)
    with pytest.raises(RefinerError, match="but the base is an SDXL refiner"):
        check_pair(ref, ref)
