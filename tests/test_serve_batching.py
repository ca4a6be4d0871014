"""The server's batching at the library level: a request's images do not depend on what shares its batch, and equal
the pipeline's own txt2img/img2img/inpaint with the same seed (tiny SD1 fixture, stochastic and deterministic
samplers)."""

import numpy as np
import pytest
from conftest import FIXTURES

from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.serve.batches import bucket, run_batch
from sd_jax.serve.fields import FieldError, Limits
from sd_jax.serve.jobs import make_job, seeds
from sd_jax.serve.schemas import Img2ImgRequest, Txt2ImgRequest
from sd_jax.sharding import make_mesh

TOL = 2e-5  # [0, 1] pixels: batch sizes change XLA's blocking on CPU, not the maths


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion.load(FIXTURES / "sd1", mesh=make_mesh((-1, 1, 1)), safety_checker=False)


def job(pipe, kind="txt2img", **kw):
    req = (Txt2ImgRequest if kind == "txt2img" else Img2ImgRequest)(**{"width": 32, "height": 32, "steps": 3, **kw})
    return make_job(pipe, "fixture", kind, req, {}, Limits(), {})


def test_a_request_gives_the_same_images_alone_and_batched(pipe):
    sampler = "Euler a"  # stochastic: each row draws its step noise from its own key
    a = dict(prompt="a red square", seed=11, batch_size=2, sampler_name=sampler)
    alone = run_batch(pipe, [job(pipe, **a)], max_batch=8)[0]
    others = [job(pipe, prompt="a blue circle", seed=3, sampler_name=sampler, negative_prompt="green"),
              job(pipe, prompt="a yellow star", seed=900, batch_size=2, sampler_name=sampler)]  # fmt: skip
    mixed = run_batch(pipe, [others[0], job(pipe, **a), others[1]], max_batch=8)  # 5 rows, padded to 8
    assert [len(m) for m in mixed] == [1, 2, 2]
    for x, y in zip(alone, mixed[1]):
        assert np.abs(x - y).max() < TOL
    # image i of the request is seed + i: the same as the pipeline's own txt2img with that seed
    ours = dict(sampler="euler_a", steps=3, height=32, width=32)
    for i, img in enumerate(alone):
        direct, _ = pipe.txt2img("a red square", negative="", seed=11 + i, guidance_scale=7.0, **ours)
        assert np.abs(np.asarray(direct)[0] - img).max() < TOL
    # and different seeds do differ: a mix-up would show
    assert np.abs(alone[0] - alone[1]).mean() > 0.01 and np.abs(alone[0] - mixed[0][0]).mean() > 0.01


def test_img2img_and_inpaint_rows_match_the_pipeline(pipe):
    import base64
    import io

    from PIL import Image

    g = np.random.default_rng(0)
    img = (g.random((32, 32, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255

    def b64(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    init = img.astype(np.float32) / 255
    plain = job(pipe, "img2img", prompt="a cat", seed=4, init_images=[b64(img)], denoising_strength=0.6,
                sampler_name="Euler")  # fmt: skip
    masked = job(pipe, "img2img", prompt="a cat", seed=4, init_images=[b64(img)], denoising_strength=0.6,
                 sampler_name="Euler", mask=b64(mask), mask_blur=0, inpainting_fill=1,
                 inpaint_full_res=False)  # fmt: skip  # "original", "whole picture": diffusers' inpaint
    assert masked.spec.mode == "inpaint" and plain.spec.mode == "img2img"
    (got,) = run_batch(pipe, [plain], max_batch=4)
    direct, _ = pipe.img2img("a cat", init, strength=0.6, negative="", seed=4, sampler="euler", steps=3,
                             guidance_scale=7.0)  # fmt: skip
    assert np.abs(np.asarray(direct)[0] - got[0]).max() < TOL
    (got,) = run_batch(pipe, [masked], max_batch=4)
    m = (mask[..., None] / 255.0).astype(np.float32)
    direct, _ = pipe.inpaint("a cat", init, m, strength=0.6, negative="", seed=4, sampler="euler", steps=3,
                             guidance_scale=7.0)  # fmt: skip
    # the pipeline's inpaint inside the mask, the original pixels outside it (A1111's overlay)
    assert np.abs(m * np.asarray(direct)[0] + (1 - m) * init - got[0]).max() < TOL
    keep = mask == 0
    assert np.abs(got[0][keep] - init[keep]).max() < 1e-6 and np.abs(got[0][~keep] - init[~keep]).mean() > 0.01


def test_seeds_buckets_and_checks(pipe):
    assert seeds(7, 3) == [7, 8, 9] and seeds(2**32 - 1, 2) == [2**32 - 1, 0]
    assert all(0 <= s < 2**32 for s in seeds(-1, 4)) and len(set(seeds(-1, 4))) == 4
    assert [bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8] and bucket(12, 8) == 12
    for kw, field in [({"width": 36}, "width"), ({"height": 4096}, "height"), ({"batch_size": 65}, "batch_size"),
                      ({"sampler_name": "DPM2 a"}, "sampler_name"), ({"scheduler": "Uniform"}, "scheduler"),
                      ({"restore_faces": True}, "restore_faces"), ({"prompt": "word " * 700}, "prompt"),
                      ({"override_settings": {"CLIP_stop_at_last_layers": 0}},
                       "override_settings.CLIP_stop_at_last_layers")]:  # fmt: skip
        with pytest.raises(FieldError) as e:
            job(pipe, **kw)
        assert e.value.field == field, (kw, e.value.field, str(e.value))
    with pytest.raises(FieldError, match="init_images is empty"):
        job(pipe, "img2img", prompt="x")
    with pytest.raises(FieldError, match="does not decode as an image") as e:
        job(pipe, "img2img", prompt="x", init_images=["bm90IGFuIGltYWdl"])
    assert e.value.field == "init_images.0"
    j = job(pipe, prompt="x", seed=5, batch_size=2, n_iter=3, sampler_name="DPM++ 2M Karras")
    assert [r.seed for r in j.rows] == [5, 6, 7, 8, 9, 10]
    assert (j.spec.sampler, j.spec.schedule) == ("dpmpp_2m", "karras")
