"""sample.py with ControlNets: --controlnet PATH[:SCALE] / --control-image (repeatable, in order), --control-start,
--control-end, --guess-mode, --canny in txt2img, img2img and inpaint; metadata; the embedded pair; bad input as
one line before any model loads."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from sd_jax.cli.sample import main
from sd_jax.infotext import parse_infotext
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.pnginfo import read_parameters


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctl")
    Image.fromarray(data.astronaut()).resize((32, 32), Image.LANCZOS).save(d / "photo.png")
    Image.fromarray(data.camera()).resize((40, 48), Image.LANCZOS).save(d / "camera.png")  # 40 wide, 48 high
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(d / "mask.png")
    (d / "bad.png").write_bytes(b"not a png")
    (d / "empty").mkdir()
    return d


def spy(monkeypatch, name):
    calls = []
    real = getattr(StableDiffusion, name)

    def wrapper(self, *a, **kw):
        calls.append(kw)
        return real(self, *a, **kw)

    monkeypatch.setattr(StableDiffusion, name, wrapper)
    return calls


def meta(path):
    return parse_infotext(read_parameters(path))


def test_txt2img_with_canny_and_the_control_image_size(fixtures_dir, files, tmp_path, monkeypatch):
    calls = spy(monkeypatch, "txt2img")
    net = fixtures_dir / "controlnet" / "sd1"
    main(["--model", str(fixtures_dir / "sd1"), "--prompt", "a cat", "--steps", "3", "--output-dir", str(tmp_path),
          "--controlnet", f"{net}:0.7", "--control-image", str(files / "camera.png"), "--canny",
          "--control-start", "0.1", "--control-end", "0.9", "--guess-mode"])  # fmt: skip
    (png,) = tmp_path.glob("00000-0.png")
    assert Image.open(png).size == (40, 48)  # diffusers: txt2img takes the control image's size
    unit = meta(png)["ControlNet 0"]  # sd-webui-controlnet's unit text
    assert unit.startswith("Module: canny, Model: sd1 [") and "Weight: 0.7, Resize Mode: Just Resize" in unit
    assert "Guidance Start: 0.1, Guidance End: 0.9" in unit and "Control Mode: ControlNet is more important" in unit
    (kw,) = calls
    assert kw["controlnet_conditioning_scale"] == [0.7] and kw["guess_mode"] is True
    assert kw["control_guidance_start"] == 0.1 and kw["control_guidance_end"] == 0.9
    (edges,) = kw["control_image"]
    assert edges.shape == (48, 40, 3) and set(np.unique(edges)) == {0.0, 1.0}


@pytest.mark.parametrize("model,args", [
    ("sd1", ["--init-image", "photo.png", "--strength", "0.6"]),
    ("inpaint", ["--init-image", "photo.png", "--mask-image", "mask.png"]),
])  # fmt: skip
def test_two_controlnets_in_img2img_and_inpaint(model, args, fixtures_dir, files, tmp_path, monkeypatch):
    mode = "inpaint" if "--mask-image" in args else "img2img"
    calls = spy(monkeypatch, mode)
    nets = fixtures_dir / "controlnet"
    main(["--model", str(fixtures_dir / model), "--prompt", "a cat", "--steps", "3", "--output-dir", str(tmp_path),
          "--controlnet", str(nets / "sd1"), "--control-image", str(files / "camera.png"),
          "--controlnet", f"{nets / 'sd1_b'}:1.5", "--control-image", str(files / "photo.png"),
          *[str(files / a) if a.endswith(".png") else a for a in args]])  # fmt: skip
    (png,) = tmp_path.glob("00000-0.png")
    m = meta(png)
    assert Image.open(png).size == (32, 32) and m.get("Mode", "img2img") == mode
    assert "Weight: 1.0, " in m["ControlNet 0"] and "Weight: 1.5, " in m["ControlNet 1"] and "ControlNet 2" not in m
    (kw,) = calls
    assert len(kw["control_image"]) == 2 and kw["controlnet_conditioning_scale"] == [1.0, 1.5]


def test_the_embedded_pair(fixtures_dir, files, tmp_path, monkeypatch):
    import sd_jax.embedded as embedded

    monkeypatch.delenv("SD_JAX_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(embedded, "default_model_path", lambda: fixtures_dir / "sd1")
    monkeypatch.setattr(embedded, "default_controlnet_path", lambda: fixtures_dir / "controlnet" / "sd1")
    main(["--prompt", "a red circle on a blue background", "--steps", "2", "--output-dir", str(tmp_path),
          "--control-image", str(files / "photo.png")])  # fmt: skip
    (png,) = tmp_path.glob("00000-0.png")
    assert meta(png)["ControlNet 0"].startswith("Module: none, Model: sd1 [")


def _load_forbidden(self_or_cls, *a, **kw):
    raise AssertionError("a model was loaded before the usage error")


NET = "FIXTURE/controlnet/sd1"
CASES = [
    (["--controlnet", NET], 2, ["--controlnet needs --control-image"]),
    (["--canny"], 2, ["--canny needs --control-image"]),
    (["--control-start", "0.5"], 2, ["--control-start needs --control-image"]),
    (["--controlnet", NET, "--controlnet", NET, "--control-image", "FILES/photo.png"], 2,
     ["2 --controlnet but 1 --control-image", "one control image per ControlNet"]),
    (["--control-image", "FILES/photo.png"], 2, ["--control-image needs --controlnet PATH[:SCALE] for --model"]),
    (["--controlnet", NET, "--control-image", "FILES/none.png"], 2, ["--control-image", "none.png: no such file"]),
    (["--controlnet", NET, "--control-image", "FILES/bad.png"], 2, ["--control-image", "bad.png: not a readable"]),
    (["--controlnet", f"{NET}:abc", "--control-image", "FILES/photo.png"], 2, ["scale 'abc' is not a number"]),
    (["--controlnet", f"{NET}:nan", "--control-image", "FILES/photo.png"], 2, ["scale 'nan' is not a finite"]),
    (["--controlnet", "FILES/nothing", "--control-image", "FILES/photo.png"], 2, ["nothing: no such file or folder"]),
    (["--controlnet", "FILES/empty", "--control-image", "FILES/photo.png"], 2, ["empty: a folder without config"]),
    (["--controlnet", NET, "--control-image", "FILES/photo.png", "--control-start", "0.6", "--control-end", "0.4"],
     2, ["--control-start 0.6 must be below --control-end 0.4"]),
    (["--controlnet", NET, "--control-image", "FILES/photo.png", "--control-end", "2"], 2, ["--control-end",
                                                                                           "outside [0.0, 1.0]"]),
    (["--controlnet", NET, "--control-image", "FILES/photo.png", "--denoise", "--init-image", "FILES/photo.png"],
     2, ["--control-image works with txt2img, img2img and inpaint, not --denoise"]),
]  # fmt: skip


@pytest.mark.parametrize("args,code,words", CASES, ids=[" ".join(c[0])[-60:] for c in CASES])
def test_bad_input_is_one_line_before_loading(args, code, words, fixtures_dir, files, tmp_path, capsys,
                                              monkeypatch):  # fmt: skip
    monkeypatch.setattr(StableDiffusion, "load", classmethod(_load_forbidden))
    from test_sample_cli_errors import _argv, _expect_one_line

    out = tmp_path / "out"
    _expect_one_line(capsys, _argv(args, fixtures_dir, files, out), code, words, out)


def test_no_embedded_controlnet_says_so(fixtures_dir, files, tmp_path, capsys, monkeypatch):
    from test_sample_cli_errors import _expect_one_line

    import sd_jax.embedded as embedded

    monkeypatch.delenv("SD_JAX_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(embedded, "default_model_path", lambda: fixtures_dir / "sd1")
    monkeypatch.setattr(embedded, "default_controlnet_path", lambda: None)
    monkeypatch.setattr(StableDiffusion, "load", classmethod(_load_forbidden))
    out = tmp_path / "out"
    argv = ["--prompt", "a cat", "--output-dir", str(out), "--control-image", str(files / "photo.png")]
    _expect_one_line(capsys, argv, 2, ["no embedded ControlNet ships with this version ; pass --controlnet"], out)


def test_a_controlnet_of_another_base_is_a_runtime_error(fixtures_dir, files, tmp_path, capsys):
    from test_sample_cli_errors import _argv, _expect_one_line

    out = tmp_path / "out"
    args = ["--controlnet", "FIXTURE/controlnet/sdxl", "--control-image", "FILES/photo.png"]
    words = ["controlnet/sdxl: ControlNet", "trained for another base model"]
    _expect_one_line(capsys, _argv(args, fixtures_dir, files, out), 1, words, out)
