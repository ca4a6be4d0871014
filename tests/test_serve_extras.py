"""The server's hires fix and ControlNet units (sd-webui-controlnet's ``alwayson_scripts`` format) on the embedded
model and its shipped shapes ControlNet: each equals the pipeline's own call with the same seed."""

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from serve_helpers import running_server

from sd_jax.embedded import default_controlnet_path
from sd_jax.infotext import parse_infotext


def b64png(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(text: str) -> tuple[np.ndarray, str]:
    im = Image.open(io.BytesIO(base64.b64decode(text)))
    return np.asarray(im.convert("RGB"), np.float64) / 255, im.info["parameters"]


@pytest.fixture(scope="module")
def server():
    with running_server("--controlnet", str(default_controlnet_path()), "--max-batch", "2") as s:
        yield s


def test_controlnet_unit_steers_the_image_as_the_pipeline_does(server):
    base, state = server
    silhouette = np.zeros((64, 64, 3), np.uint8)
    silhouette[16:48, 8:56] = 255  # a wide rectangle
    unit = {"image": b64png(silhouette), "module": "none", "model": "default_controlnet", "weight": 1.0,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced", "enabled": True}  # fmt: skip
    body = {"prompt": "a red square on a blue background", "seed": 3, "steps": 6, "width": 64, "height": 64,
            "sampler_name": "Euler", "alwayson_scripts": {"ControlNet": {"args": [unit]}}}  # fmt: skip
    r = requests.post(base + "/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got, _ = decode(r.json()["images"][0])
    direct, _ = state.pipe.txt2img("a red square on a blue background", negative="", seed=3, steps=6, sampler="euler",
                                   guidance_scale=7.0, height=64, width=64,
                                   control_image=[silhouette.astype(np.float32) / 255])  # fmt: skip
    assert np.abs(got - np.asarray(direct)[0]).max() <= 1 / 255 + 1e-6
    plain = requests.post(base + "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {}}, timeout=300)
    assert np.abs(decode(plain.json()["images"][0])[0] - got).mean() > 0.02  # the unit did steer it
    bad = requests.post(base + "/sdapi/v1/txt2img", timeout=60, json={**body, "alwayson_scripts": {
        "ControlNet": {"args": [{**unit, "model": "control_v11p_sd15_canny"}]}}})  # fmt: skip
    assert bad.status_code == 422 and "default_controlnet" in bad.json()["detail"][0]["msg"]


def test_hires_fix_request_matches_the_pipelines_hires_fix(server):
    base, state = server
    body = {"prompt": "a blue circle", "seed": 8, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler",
            "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 3, "denoising_strength": 0.5,
            "hr_upscaler": "Latent"}  # fmt: skip
    r = requests.post(base + "/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got, text = decode(r.json()["images"][0])
    assert got.shape == (96, 96, 3)
    fields = parse_infotext(text)
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) == ("1.5", "3", "Latent")
    assert fields["Size"] == "64x64"  # A1111: the first pass's size, and the hires keys
    direct, _ = state.pipe.hires_fix("a blue circle", scale=1.5, hires_steps=3, denoise=0.5, upscaler="Latent",
                                     steps=4, seed=8, height=64, width=64, negative="", sampler="euler",
                                     guidance_scale=7.0)  # fmt: skip
    assert np.abs(got - np.asarray(direct)[0]).max() <= 1 / 255 + 1e-6
    assert json.loads(r.json()["info"])["width"] == 64
