"""What sample.py's images carry and how it reads them back: A1111 infotext in PNG text, JPEG/WebP EXIF
UserComment and GIF comments; python -m sd_jax.pnginfo; --from-image reproducing txt2img and img2img images
bit for bit on the embedded model; flags overriding the file; bad images and other models' parameters."""

import numpy as np
import pytest
from PIL import Image

from sd_jax import hashing
from sd_jax import infotext as it
from sd_jax.cli import sample, sample_output
from sd_jax.cli.sample import main
from sd_jax.embedded import default_model_path
from sd_jax.pnginfo import main as pnginfo_main
from sd_jax.pnginfo import read_parameters, write_exif

SMALL = ["--steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(autouse=True)
def embedded(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("SD_JAX_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv(hashing.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hashes.json"))
    if default_model_path() is None:
        pytest.skip("no embedded model in this install")


def fields(path):
    return it.parse_infotext(read_parameters(path))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_txt2img_batch_infotext_and_from_image_is_bit_identical(tmp_path, capsys):
    out = tmp_path / "a"
    main(["--prompt", "a red circle, on blue", "--negative-prompt", "blurry: a lot", "--seed", "7",
          "--batch-size", "2", "--num-images", "2", "--clip-skip", "1", "--output-dir", str(out), *SMALL])  # fmt: skip
    text = read_parameters(out / "00001-7.png")
    lines = text.split("\n")
    assert lines[0] == "a red circle, on blue" and lines[1] == "Negative prompt: blurry: a lot"
    want = hashing.model_hash(default_model_path())
    assert lines[2].startswith(f"Steps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.5, Seed: 7, "
                               f"Size: 32x32, Model hash: {want}, Model: default_model, Clip skip: 2, ")  # fmt: skip
    assert lines[2].endswith("Batch size: 2, Batch pos: 1, Version: sd-jax 0.1.0") and len(want) == 10
    f = fields(out / "00001-7.png")
    assert {"Steps", "Seed", "CFG scale", "Sampler", "Model hash"} <= set(f)  # what civitai requires
    assert fields(out / "00000-grid.png")["Batch pos"] == "0"  # the grid carries the first image's
    capsys.readouterr()
    pnginfo_main([str(out / "00001-7.png")])
    assert capsys.readouterr().out == text + "\n"
    # the second image of the batch, again: same model and seed, the batch re-sampled, only that image written
    again = tmp_path / "b"
    main(["--from-image", str(out / "00001-7.png"), "--output-dir", str(again)])
    assert sorted(p.name for p in again.iterdir()) == ["00000-7.png"]
    assert np.array_equal(pixels(again / "00000-7.png"), pixels(out / "00001-7.png"))
    assert not np.array_equal(pixels(out / "00000-7.png"), pixels(out / "00001-7.png"))
    assert read_parameters(again / "00000-7.png") == text


@pytest.mark.slow  # two CLI runs, ~2 min; --from-image stays covered by the txt2img and hires tests
def test_img2img_from_image_and_webp(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    init = ["--init-image", str(tmp_path / "init.png")]
    main(["--prompt", "a blue square", "--seed", "3", "--strength", "0.6", "--output-dir", str(tmp_path / "a"),
          "--format", "webp", "--sampler", "dpmpp_2m", "--schedule", "karras", *init, *SMALL])  # fmt: skip
    (webp,) = (tmp_path / "a").glob("00000-3.webp")
    f = fields(webp)  # from the EXIF UserComment
    assert (f["Denoising strength"], f["Sampler"], f["Schedule type"], f["Seed"]) == ("0.6", "DPM++ 2M", "Karras", "3")
    raw = Image.open(webp).getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\x00" and raw[8:].decode("utf-16-be") == read_parameters(webp)  # as piexif writes
    assert b"\x92\x86\x00\x07" in write_exif("x")  # UserComment as type UNDEFINED (BYTE would read as numbers)
    with pytest.raises(SystemExit) as e:  # an img2img image needs its input image back
        main(["--from-image", str(webp), "--output-dir", str(tmp_path / "b")])
    assert e.value.code == 2
    main(["--from-image", str(webp), "--format", "png", "--output-dir", str(tmp_path / "b"), *init])
    main(["--prompt", "a blue square", "--seed", "3", "--strength", "0.6", "--output-dir", str(tmp_path / "c"),
          "--sampler", "dpmpp_2m", "--schedule", "karras", *init, *SMALL])  # fmt: skip
    assert np.array_equal(pixels(tmp_path / "b" / "00000-3.png"), pixels(tmp_path / "c" / "00000-3.png"))


def test_flags_given_with_from_image_override_its_values(tmp_path):
    img = tmp_path / "in.png"
    params = {"Steps": 9, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 5.5, "Seed": 42,
              "Size": "48x40", "Clip skip": 2, "Version": "v1.9.4"}  # fmt: skip
    text = it.format_infotext("a cat\nin a hat", "dark", params)
    sample_output.save_image(np.zeros((8, 8, 3), np.uint8), img, text)
    parser = sample.build_parser()
    sample.sample_adapters.add_flags(parser)
    argv = ["--from-image", str(img), "--seed", "5", "--prompt", "a dog"]
    args = parser.parse_args(argv)
    sample.sample_params.apply_image(args, parser, argv)
    assert (args.seed, args.prompt, args.negative_prompt) == (5, ["a dog"], "dark")
    assert (args.steps, args.sampler, args.schedule, args.guidance_scale) == (9, "dpmpp_2m", "karras", 5.5)
    assert (args.width, args.height, args.clip_skip, args.batch_size) == (48, 40, 1, 8)


def test_bad_from_image_and_another_models_parameters(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain)

    def forbidden(*a, **kw):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(sample, "load_pipeline", forbidden)
    with pytest.raises(SystemExit) as e:
        main(["--from-image", str(plain), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "carries no generation parameters" in err
    assert not (tmp_path / "o").exists()
    other = tmp_path / "other.png"
    params = {"Steps": 2, "Sampler": "Euler", "CFG scale": 7, "Seed": 1, "Size": "32x32", "Model hash": "0123456789",
              "Model": "elsewhere"}  # fmt: skip
    text = it.format_infotext("a cat", None, params)
    sample_output.save_image(np.zeros((8, 8, 3), np.uint8), other, text)

    class Loaded(Exception):
        pass

    monkeypatch.setattr(sample, "load_pipeline", lambda *a: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(Loaded):  # a warning, then the run goes on (to loading the model)
        main(["--from-image", str(other), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    want = hashing.model_hash(default_model_path())
    assert "model hash 0123456789 (elsewhere)" in err and f"hashes to {want}" in err
    with pytest.raises(SystemExit) as e:  # pnginfo: exit 1, one line, for an image without parameters
        pnginfo_main([str(plain)])
    assert e.value.code == 1 and "plain.png has no generation parameters" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_every_format_and_the_gif_carry_the_text(tmp_path, fmt):
    text = 'a "cat", é\nNegative prompt: x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Note: "a: b"'
    img = np.full((16, 16, 3), 128, np.uint8)
    path = sample_output.save_image(img, tmp_path / f"x.{fmt}", text, fmt)
    assert read_parameters(path) == text and Image.open(path).format == sample_output.FORMATS[fmt][0]
    w = sample_output.Writer(tmp_path / "g")
    gif = w.gif(np.stack([np.zeros((8, 8, 3), np.float32), np.ones((8, 8, 3), np.float32)]), text)
    assert read_parameters(gif) == text and Image.open(gif).n_frames == 2


def test_from_image_names_missing_or_different_loras(fixtures_dir, tmp_path, capsys):
    lora = fixtures_dir / "embeddings" / "sd1_emb.safetensors"  # any safetensors: only its hash is read
    img = tmp_path / "in.png"
    params = {"Steps": 2, "Sampler": "Euler", "CFG scale": 7, "Seed": 1, "Lora hashes": "add_detail: 7c6bad76eb54"}
    sample_output.save_image(np.zeros((8, 8, 3), np.uint8), img, it.format_infotext("a cat", None, params))
    parser = sample.build_parser()
    sample.sample_adapters.add_flags(parser)
    other = f"(hash {hashing.lora_hash(lora)}) is none of the LoRAs"
    for extra, words in (([], "used Lora (add_detail: 7c6bad76eb54) ; pass --lora"), (["--lora", str(lora)], other)):
        argv = ["--from-image", str(img), *extra]
        sample.sample_params.apply_image(parser.parse_args(argv), parser, argv)
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_hires_fix_image_from_image_is_bit_identical(tmp_path):
    main(["--prompt", "a red circle", "--seed", "2", "--hires-scale", "2", "--hires-steps", "1", "--hires-denoise",
          "0.5", "--output-dir", str(tmp_path / "a"), *SMALL])  # fmt: skip
    f = fields(tmp_path / "a" / "00000-2.png")
    assert (f["Size"], f["Hires upscale"], f["Hires steps"], f["Denoising strength"]) == ("32x32", "2", "1", "0.5")
    assert Image.open(tmp_path / "a" / "00000-2.png").size == (64, 64)
    main(["--from-image", str(tmp_path / "a" / "00000-2.png"), "--output-dir", str(tmp_path / "b")])
    assert np.array_equal(pixels(tmp_path / "b" / "00000-2.png"), pixels(tmp_path / "a" / "00000-2.png"))
