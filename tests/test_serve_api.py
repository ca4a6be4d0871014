"""The server through a real A1111 client (``webuiapi`` from PyPI) on 127.0.0.1: txt2img, img2img with a mask,
options (switching to a tiny fixture under --models-dir and back), samplers, models, png-info; plus auth and the
CLI's refusals."""

import subprocess
import sys

import numpy as np
import pytest
import requests
from conftest import FIXTURES
from PIL import Image
from serve_helpers import running_server

from sd_jax.infotext import parse_infotext


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    (models / "tiny_sd1").symlink_to(FIXTURES / "sd1", target_is_directory=True)
    (models / "notes.txt").write_text("not a model")
    with running_server("--max-batch", "4", "--models-dir", str(models), "--max-body-mb", "2") as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    import webuiapi

    base, _ = server
    host, port = base.rsplit(":", 1)
    return webuiapi.WebUIApi(host=host.split("//")[1], port=int(port), sampler="Euler a", steps=4)


def check_result(r, seed, n, size):
    assert len(r.images) == n and all(im.size == size for im in r.images)
    assert r.info["all_seeds"] == [seed + i for i in range(n)] and r.info["seed"] == seed
    for i, im in enumerate(r.images):
        fields = parse_infotext(im.info["parameters"])  # the PNG carries its infotext
        assert fields["Seed"] == str(seed + i) and fields["Size"] == f"{size[0]}x{size[1]}"
        assert im.info["parameters"] == r.info["infotexts"][i]
        assert np.asarray(im.convert("RGB")).std() > 1  # a decoded picture, not a blank
    return fields


def test_webuiapi_txt2img_img2img_options_and_lists(server, api):
    base, state = server
    names = api.util_get_model_names()
    assert len(names) == 2 and any(n.startswith("tiny_sd1") for n in names)  # notes.txt is not a model
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert "karras" in api.util_get_scheduler_names()
    r = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=1234, width=64, height=64, batch_size=2,
                    cfg_scale=5)  # fmt: skip
    fields = check_result(r, 1234, 2, (64, 64))
    assert fields["Sampler"] == "Euler a" and fields["Steps"] == "4" and fields["CFG scale"] == "5"
    assert fields["Negative prompt"] == "blue" and fields["Prompt"] == "a red circle"
    assert r.parameters["prompt"] == "a red circle"  # the request, echoed
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r2 = api.img2img(images=[r.images[0]], mask_image=mask, prompt="a blue square", seed=77, width=64, height=64,
                     denoising_strength=0.6, mask_blur=0)  # fmt: skip
    f2 = check_result(r2, 77, 1, (64, 64))
    assert f2["Denoising strength"] == "0.6" and f2["Mode"] == "inpaint"
    before, after = np.asarray(r.images[0].convert("RGB"), float), np.asarray(r2.images[0].convert("RGB"), float)
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    assert np.abs(after - before)[~inside].max() <= 1  # A1111's overlay: the original outside the mask
    assert np.abs(after - before)[inside].mean() > 2
    info = api.png_info(r.images[1])
    assert "Seed: 1235" in info.info
    # options: switch to the fixture, sample there (its native 32x32), switch back
    tiny = next(n for n in names if n.startswith("tiny_sd1"))
    api.util_set_model(tiny)
    assert api.util_get_current_model() == tiny and state.model.endswith("tiny_sd1")
    r3 = api.txt2img(prompt="a cat", seed=5, width=32, height=32, sampler_name="DPM++ 2M", scheduler="Karras")
    f3 = check_result(r3, 5, 1, (32, 32))
    assert (f3["Model"], f3["Sampler"], f3["Schedule type"]) == ("tiny_sd1", "DPM++ 2M", "Karras")
    api.set_options({"sd_model_checkpoint": names[0] if names[0] != tiny else names[1], "CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2 and api.util_get_current_model() != tiny
    r4 = api.txt2img(prompt="a red circle", seed=1234, width=64, height=64)
    assert parse_infotext(r4.images[0].info["parameters"])["Clip skip"] == "2"
    api.set_options({"CLIP_stop_at_last_layers": 1})


def test_seed_minus_one_draws_and_reports_the_seed(server, api):
    r = api.txt2img(prompt="a star", seed=-1, width=64, height=64, n_iter=2)
    seeds = r.info["all_seeds"]
    assert seeds[1] == seeds[0] + 1 and 0 <= seeds[0] < 2**32
    again = api.txt2img(prompt="a star", seed=seeds[1], width=64, height=64)  # the reported seed reproduces it
    diff = np.abs(np.asarray(again.images[0], float) - np.asarray(r.images[1], float))
    assert diff.max() <= 1  # batch 2 vs 1: XLA's float blocking may move a value by one 8-bit step


def test_refusals_name_the_field_and_paths_never_resolve(server):
    base, _ = server
    for path, body, field in [
        ("/sdapi/v1/txt2img", {"steps": -3}, "steps"),
        ("/sdapi/v1/txt2img", {"batch_size": 100000}, "batch_size"),
        ("/sdapi/v1/txt2img", {"width": 100000, "height": 100000}, "width"),
        ("/sdapi/v1/txt2img", {"cfg_scale": "lots"}, "cfg_scale"),
        ("/sdapi/v1/txt2img", {"sampler_name": "Karras Magic"}, "sampler_name"),
        ("/sdapi/v1/img2img", {"init_images": ["%%%not-base64%%%"]}, "init_images"),
        ("/sdapi/v1/img2img", {"init_images": ["aGVsbG8="], "mask": "aGVsbG8="}, "init_images"),
        ("/sdapi/v1/options", {"sd_model_checkpoint": "../../etc/passwd"}, "sd_model_checkpoint"),
        ("/sdapi/v1/options", {"sd_model_checkpoint": str(FIXTURES / "sd1")}, "sd_model_checkpoint"),
    ]:  # fmt: skip
        r = requests.post(base + path, json=body, timeout=60)
        assert r.status_code == 422, (body, r.status_code, r.text)
        locs = [d["loc"] for d in r.json()["detail"]]
        assert any(field in loc for loc in locs), (body, locs)
    r = requests.post(base + "/sdapi/v1/txt2img", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = requests.post(base + "/sdapi/v1/txt2img", data=b"x" * (3 * 2**20), timeout=60)
    assert r.status_code == 413
    r = requests.post(base + "/sdapi/v1/txt2img", json={"prompt": "ok", "width": 64, "height": 64, "steps": 2,
                                                        "no_such_field": 1}, timeout=120)  # fmt: skip
    assert r.status_code == 200 and len(r.json()["images"]) == 1  # unknown fields are ignored (and logged)
    assert requests.get(base + "/health", timeout=10).json()["status"] == "ready"


def test_api_auth_and_listen_flags(tmp_path):
    with running_server("--api-auth", "ann:secret") as (base, _):
        assert requests.get(base + "/sdapi/v1/samplers", timeout=10).status_code == 401
        assert requests.get(base + "/sdapi/v1/samplers", auth=("ann", "wrong"), timeout=10).status_code == 401
        assert requests.get(base + "/sdapi/v1/samplers", auth=("ann", "secret"), timeout=10).status_code == 200
    for flags, words in [(["--listen"], "--api-auth"), (["--max-batch", "6"], "power of two"),
                         (["--models-dir", str(tmp_path / "none")], "no such folder")]:  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "sd_jax.serve", *flags], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
