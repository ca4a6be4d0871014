"""sample.py end to end on the fixtures: every mode writes numbered PNGs with metadata; batches, reruns, random
seeds, init-image fitting and the progress bar; 16-bit inputs. Bad input: tests/test_sample_cli_errors.py."""

import re

import numpy as np
import pytest
from PIL import Image
from skimage import data

from sd_jax.cli import sample
from sd_jax.cli.sample import main
from sd_jax.infotext import parse_infotext
from sd_jax.pipelines import images as images_lib
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.pnginfo import read_parameters


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    Image.fromarray(data.astronaut()).resize((32, 32), Image.LANCZOS).save(d / "photo.png")
    Image.fromarray(data.astronaut()).resize((45, 30), Image.LANCZOS).save(d / "odd.png")
    Image.fromarray(data.coffee()).resize((16, 16), Image.LANCZOS).save(d / "small.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(d / "mask.png")
    noisy = np.clip(
        np.asarray(Image.open(d / "photo.png"), np.float32) + np.random.default_rng(0).normal(0, 25, (32, 32, 3)),
        0,
        255,
    )
    Image.fromarray(noisy.astype(np.uint8)).save(d / "noisy.png")
    (d / "prompts.txt").write_text("a red circle\n\na blue square\n")
    return d


def run(fixtures_dir, out, *args, model="sd1"):
    main(["--model", str(fixtures_dir / model), "--steps", "3", "--output-dir", str(out), *args])
    return out


def meta(path):
    return parse_infotext(read_parameters(path))


def test_txt2img_batches_numbering_rerun_random_seed_and_progress(fixtures_dir, tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr(sample, "PROGRESS_DISABLE", False)
    out = tmp_path / "out"
    # 2 prompts x 2 images in batches of 3: seeds 5 (3 images) and 6 (1 image), numbered consecutively
    run(fixtures_dir, out, "--prompts-file", str(images / "prompts.txt"), "--num-images", "2", "--batch-size", "3",
        "--negative-prompt", "blurry", "--seed", "5", "--save-steps", "0,2")  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-5.png", "00000-grid.png", "00000-progression.png", "00001-5.png", "00002-5.png",
                     "00003-6.png"]  # fmt: skip
    m = meta(out / "00002-5.png")
    assert m["Prompt"] == "a blue square" and m["Seed"] == "5" and m["Negative prompt"] == "blurry"
    assert m["Sampler"] == "DDIM" and m["Steps"] == "3" and m["Model"] == "sd1"  # the folder's own scheduler
    assert (m["Batch size"], m["Batch pos"]) == ("3", "2")  # the batch's noise is drawn at once from its seed
    last = meta(out / "00003-6.png")
    assert last["Prompt"] == "a blue square" and last["Seed"] == "6" and "Batch size" not in last
    assert Image.open(out / "00000-progression.png").size == (64, 32)  # two x0 estimates side by side
    err = capsys.readouterr().err
    assert "3/3" in err  # the bar reached the last step of each batch through pipe.on_step
    # a rerun continues the numbering; --seed -1 draws a seed, prints it and records it; 72 px is far from 32
    run(fixtures_dir, out, "--prompt", "a cat", "--seed", "-1", "--height", "72", "--width", "32")
    printed = re.search(r"seed: (\d+) \(random\)", capsys.readouterr().out)
    new = sorted(set(p.name for p in out.iterdir()) - set(names))
    assert printed and new == [f"00004-{printed.group(1)}.png"]
    assert meta(out / new[0])["Seed"] == printed.group(1) and Image.open(out / new[0]).size == (32, 72)


def spy(monkeypatch, name):
    calls = []
    real = getattr(StableDiffusion, name)

    def wrapper(self, *a, **kw):
        calls.append(kw)
        return real(self, *a, **kw)

    monkeypatch.setattr(StableDiffusion, name, wrapper)
    return calls


COMMON = ["--vae-tiling", "on", "--schedule", "default", "--sampler", "euler"]
TEXT = ["--clip-skip", "1", "--guidance-rescale", "0.5"]


@pytest.mark.parametrize(
    "mode,args,model",
    [
        ("img2img", ["--init-image", "photo.png", "--strength", "0.5", *TEXT], "sd1"),
        ("inpaint", ["--init-image", "photo.png", "--mask-image", "mask.png", *TEXT], "inpaint"),
        ("inpaint", ["--init-image", "photo.png", "--mask-image", "mask.png"], "sd1"),
        ("denoise", ["--init-image", "noisy.png", "--denoise"], "sd1"),
        ("upscale", ["--init-image", "small.png", "--upscale"], "upscale"),
    ],
)
def test_image_modes(mode, args, model, fixtures_dir, tmp_path, images, monkeypatch):
    calls = spy(monkeypatch, mode)
    args = [str(images / a) if a.endswith(".png") else a for a in args]
    out = run(fixtures_dir, tmp_path / "out", "--prompt", "a cat", *COMMON, *args, model=model)
    (png,) = out.glob("00000-0.png")
    size = 64 if mode == "upscale" else 32
    m = meta(png)
    assert Image.open(png).size == (size, size) and m.get("Mode", "img2img") == mode
    assert m.get("Denoising strength") == ("0.5" if mode == "img2img" else None)
    (kw,) = calls
    assert kw["tiled"] is True and kw["schedule"] == "default" and kw["sampler"] == "euler"
    if "--clip-skip" in args:
        assert kw["clip_skip"] == 1 and kw["guidance_rescale"] == 0.5


def test_init_image_is_fitted_to_a_multiple_of_8_with_a_note(fixtures_dir, tmp_path, images, capsys):
    out = run(fixtures_dir, tmp_path / "out", "--prompt", "a cat", "--init-image", str(images / "odd.png"))
    assert "note: --init-image 45x30 resized to a multiple of 8: 40x24" in capsys.readouterr().out
    assert Image.open(out / "00000-0.png").size == (40, 24)
    # --width/--height set the size an init image is fitted to (A1111); crop scales to cover, then center-crops
    run(fixtures_dir, out, "--prompt", "a cat", "--init-image", str(images / "odd.png"), "--width", "32",
        "--height", "32", "--resize-mode", "crop")  # fmt: skip
    assert "45x30 scaled and center-cropped to --width/--height: 32x32" in capsys.readouterr().out
    assert Image.open(out / "00001-0.png").size == (32, 32)


def test_single_file_with_config_dir(fixtures_dir, tmp_path):
    main(["--model", str(fixtures_dir / "single_file" / "sd1.safetensors"), "--config-dir", str(fixtures_dir / "sd1"),
          "--prompt", "a cat", "--steps", "2", "--output-dir", str(tmp_path)])  # fmt: skip
    assert Image.open(tmp_path / "00000-0.png").size == (32, 32)


def test_interpolation_gif(fixtures_dir, tmp_path):
    out = run(fixtures_dir, tmp_path / "out", "--prompt", "a cat", "--interpolate", "a dog", "--frames", "3")
    gif = Image.open(out / "00000-interpolate.gif")
    assert gif.n_frames == 3 and len(list(out.glob("0000[0-2]-0.png"))) == 3
    # each frame records what it is: seed A's noise slerped towards seed B's by its fraction, prompt A towards B
    frames = [meta(out / f"0000{k}-0.png") for k in range(3)]
    assert [(m["Seed"], m["Variation seed"], m["Variation seed strength"], m["Frame"]) for m in frames] == [
        ("0", "1", "0", "0"), ("0", "1", "0.5", "1"), ("0", "1", "1", "2")]  # fmt: skip
    assert all(m["Prompt"] == "a cat" and m["Interpolate prompt"] == "a dog" and m["Mode"] == "interpolate"
               and m["Frames"] == "3" for m in frames)  # fmt: skip
    g = parse_infotext(read_parameters(out / "00000-interpolate.gif"))  # the GIF's comment
    assert (g["Seed"], g["Variation seed"], g["Frames"], g["Interpolate prompt"]) == ("0", "1", "3", "a dog")
    # --from-image on the middle frame makes that frame again, alone
    main(["--model", str(fixtures_dir / "sd1"), "--from-image", str(out / "00001-0.png"),
          "--output-dir", str(tmp_path / "again")])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["00000-0.png"]
    again = np.asarray(Image.open(tmp_path / "again" / "00000-0.png"))
    assert np.array_equal(again, np.asarray(Image.open(out / "00001-0.png")))


def test_fit_resize_and_crop():
    img = Image.fromarray(np.tile(np.arange(45, dtype=np.uint8)[None, :, None] * 5, (30, 1, 3)))
    assert images_lib.fitted_size((451, 300), (None, None), 8) == (448, 296)
    assert images_lib.fitted_size((451, 300), (512, None), 8) == (512, 296)
    resized = np.asarray(images_lib.fit(img, (40, 24), "resize"))
    cropped = np.asarray(images_lib.fit(img, (24, 24), "crop"))  # scale 30 -> 24 (x0.8): 36 wide, 6 cut each side
    assert resized.shape == (24, 40, 3) and cropped.shape == (24, 24, 3)
    assert resized[0, 0, 0] < 10 and 30 < cropped[0, 0, 0] < 50  # the crop starts ~7 source columns in


def test_16_bit_grayscale_image_and_mask_keep_their_levels(tmp_path):
    cam = data.camera()  # uint8 [512, 512]
    Image.fromarray(cam.astype(np.uint16) * 257).save(tmp_path / "cam16.png")
    assert Image.open(tmp_path / "cam16.png").mode in ("I;16", "I")
    img = images_lib.load_image(tmp_path / "cam16.png")
    mask = images_lib.load_mask(tmp_path / "cam16.png")
    want = cam.astype(np.float32) / 255
    assert np.abs(img[..., 0] - want).max() < 1e-6 and np.abs(mask[..., 0] - want).max() < 1e-6
    assert abs(float((img > 0.99).mean()) - float((want > 0.99).mean())) < 1e-3  # was 93% white
