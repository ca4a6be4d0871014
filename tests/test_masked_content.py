"""Inpainting's masked content (A1111's ``inpainting_fill``) and "Only masked" area (``inpaint_full_res``): the fill
paints from the surroundings and keeps the known pixels, the latent modes hold noise or zeros under the mask, the
crop box has the sampling aspect; the server's default (fill, only masked) pastes the sampled box back at the
image's own size, with the original outside the mask."""

import base64
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from sd_jax.embedded import default_model_path
from sd_jax.infotext import parse_infotext
from sd_jax.pipelines import masked_content as MC
from sd_jax.pipelines import starts as S
from sd_jax.pipelines.images import resize_array
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.serve.batches import response, run_batch
from sd_jax.serve.fields import Limits
from sd_jax.serve.jobs import make_job
from sd_jax.serve.schemas import Img2ImgRequest


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion.load(default_model_path())


def halves():
    img = np.zeros((1, 32, 48, 3), np.float32)
    img[:, :, :24] = (1.0, 0.0, 0.0)  # red left, blue right
    img[:, :, 24:] = (0.0, 0.0, 1.0)
    mask = np.zeros((1, 32, 48, 1), np.float32)
    mask[:, 8:24, 16:32] = 1.0  # over the border between them
    return img, mask


def test_fill_paints_from_the_surroundings_and_keeps_the_known_pixels():
    img, mask = halves()
    out = MC.fill(img, mask)
    known = mask[..., 0] == 0
    assert np.array_equal(out[known], img[known])
    inner = out[0, 12:20]  # the masked rows, away from their top and bottom edges
    assert inner[:, 16:20, 0].min() > 0.6 and inner[:, 16:20, 2].max() < 0.4  # left part: red, as beside it
    assert inner[:, 28:32, 2].min() > 0.6 and inner[:, 28:32, 0].max() < 0.4  # right part: blue
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert np.array_equal(MC.fill(img, np.zeros_like(mask)), img)


def test_crop_box_has_the_sampling_aspect_within_the_image():
    m = np.zeros((96, 128))
    m[30:40, 50:90] = 1  # 40 wide, 10 high
    assert MC.crop_box(m, 0, 64, 64) == (50, 15, 90, 55)  # rows added around it: 40 x 40
    x0, y0, x1, y1 = MC.crop_box(m, 8, 64, 32)
    assert (x0, x1) == (42, 98) and (x1 - x0) == 2 * (y1 - y0) and y0 <= 22 and y1 >= 48
    edge = np.zeros((96, 128))
    edge[0:4, 120:128] = 1  # in a corner: the box shifts inside the image
    x0, y0, x1, y1 = MC.crop_box(edge, 4, 64, 64)
    assert 0 <= x0 and x1 == 128 and y0 == 0 and x1 - x0 == y1 - y0
    assert MC.crop_box(np.zeros((96, 128)), 4, 64, 64) == (0, 0, 128, 96)  # nothing masked: the whole image


def test_latent_modes_hold_noise_or_zeros_under_the_mask(pipe):
    img, mask = halves()
    img, mask = np.repeat(np.repeat(img, 2, 1), 2, 2)[:, :64, :64], np.repeat(np.repeat(mask, 2, 1), 2, 2)[:, :64, :64]
    grid = pipe._grid("euler", 6, "default")
    key = jax.random.key(3)
    got = {m: S.inpaint(pipe, key, 1, img, mask, grid, 0.6, masked_content=m) for m in MC.MODES}
    small = np.asarray(got["original"].mask)
    inside = small[..., 0] > 0.5
    z_orig, z_fill = np.asarray(got["original"].x0), np.asarray(got["fill"].x0)
    assert np.abs(z_orig - z_fill)[inside].mean() > 0.05  # fill changed what is under the mask
    assert np.array_equal(np.asarray(got["latent_nothing"].x0)[inside], np.zeros_like(z_fill[inside]))
    noise = np.asarray(got["original"].noise)
    assert np.array_equal(np.asarray(got["latent_noise"].x0)[inside], noise[inside])  # the seed's start noise
    assert np.array_equal(np.asarray(got["latent_noise"].x0)[~inside], z_fill[~inside])
    with pytest.raises(ValueError, match="masked_content='blank'"):
        S.inpaint(pipe, key, 1, img, mask, grid, 0.6, masked_content="blank")


def b64(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_server_default_inpaints_only_the_masked_box_at_the_images_size(pipe):
    g = np.random.default_rng(0)
    img = (g.random((96, 128, 3)) * 255).astype(np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    mask[40:56, 60:84] = 255
    req = Img2ImgRequest(prompt="a red circle", seed=5, steps=4, width=64, height=64, sampler_name="Euler",
                         denoising_strength=0.7, init_images=[b64(img)], mask=b64(mask), mask_blur=0,
                         inpaint_full_res_padding=8)  # fmt: skip  # A1111's defaults: fill, only masked
    job = make_job(pipe, "m", "img2img", req, {}, Limits(), {})
    (got,) = run_batch(pipe, [job], max_batch=2)
    assert got[0].shape == (96, 128, 3)  # the image's own size, not width x height
    init, m = img.astype(np.float32) / 255, (mask[..., None] / 255.0).astype(np.float32)
    assert np.abs(got[0] - init)[mask == 0].max() < 1e-6  # the original outside the mask
    x0, y0, x1, y1 = MC.crop_box(m[..., 0], 8, 64, 64)
    assert (x1 - x0, y1 - y0) == (40, 40)
    crop = resize_array(init[y0:y1, x0:x1], (64, 64))
    direct, _ = pipe.inpaint("a red circle", crop, resize_array(m[y0:y1, x0:x1], (64, 64)), strength=0.7, seed=5,
                             steps=4, sampler="euler", guidance_scale=7.0, negative="",
                             masked_content="fill")  # fmt: skip
    want = init.copy()
    want[y0:y1, x0:x1] = resize_array(np.asarray(direct)[0], (40, 40))
    assert np.abs(got[0] - (m * want + (1 - m) * init)).max() < 2e-5
    assert np.abs(got[0] - init)[mask > 0].mean() > 0.02  # the box was repainted
    fields = parse_infotext(json.loads(response(job, got, "m")["info"])["infotexts"][0])
    assert fields["Masked content"] == "fill" and fields["Inpaint area"] == "Only masked"
    assert fields["Masked area padding"] == "8" and fields["Size"] == "64x64"


def test_sample_cli_masked_content_is_recorded_and_read_back(tmp_path):
    from sd_jax.cli.sample import main
    from sd_jax.pnginfo import read_parameters

    img, mask = halves()
    Image.fromarray((np.repeat(np.repeat(img[0], 2, 0), 2, 1)[:64, :64] * 255).astype(np.uint8)).save(
        tmp_path / "i.png"
    )
    Image.fromarray((np.repeat(np.repeat(mask[0, ..., 0], 2, 0), 2, 1)[:64, :64] * 255).astype(np.uint8)).save(
        tmp_path / "m.png")  # fmt: skip
    common = ["--init-image", str(tmp_path / "i.png"), "--mask-image", str(tmp_path / "m.png"), "--steps", "3",
              "--strength", "0.6", "--prompt", "a green circle"]  # fmt: skip
    main([*common, "--masked-content", "latent_nothing", "--output-dir", str(tmp_path / "a")])
    main([*common, "--output-dir", str(tmp_path / "b")])
    main(["--from-image", str(tmp_path / "a" / "00000-0.png"), "--init-image", str(tmp_path / "i.png"),
          "--mask-image", str(tmp_path / "m.png"), "--output-dir", str(tmp_path / "c")])  # fmt: skip
    a, b, c = (np.asarray(Image.open(tmp_path / k / "00000-0.png"), np.int16) for k in "abc")
    assert parse_infotext(read_parameters(tmp_path / "a" / "00000-0.png"))["Masked content"] == "latent nothing"
    assert "Masked content" not in parse_infotext(read_parameters(tmp_path / "b" / "00000-0.png"))
    assert np.abs(a - b).mean() > 1 and np.array_equal(a, c)  # it mattered, and --from-image brings it back
