"""Options every pipeline mode shares: the folder's own sampler, VAE tiling, progress, guidance rescale and clip
skip beyond txt2img, and the API's checks of its numbers and images."""

import jax
import numpy as np
import pytest

from sd_jax.pipelines.pipeline import StableDiffusion


@pytest.fixture(scope="module")
def sd1():
    from conftest import FIXTURES

    return StableDiffusion.load(FIXTURES / "sd1")


@pytest.fixture(scope="module")
def photo():
    from skimage import data, transform

    return transform.resize(data.astronaut(), (64, 64), anti_aliasing=True).astype(np.float32)


def test_default_sampler_is_the_folders_scheduler(sd1):
    from conftest import FIXTURES

    assert sd1.scheduler_config["_class_name"] == "DDIMScheduler" and sd1.default_sampler == "ddim"
    assert StableDiffusion.load(FIXTURES / "sdxl").default_sampler == "euler"
    a, _ = sd1.txt2img(["a cat"], steps=3, seed=1)
    b, _ = sd1.txt2img(["a cat"], steps=3, seed=1, sampler="ddim")
    c, _ = sd1.txt2img(["a cat"], steps=3, seed=1, sampler="euler")
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3


def test_on_step_reports_each_step_from_the_running_loop(sd1, photo):
    seen = []
    sd1.on_step = lambda i, n: seen.append((i, n))
    try:
        sd1.txt2img(["a cat"], steps=3, seed=0)
        assert sorted(seen) == [(1, 3), (2, 3), (3, 3)]
        seen.clear()
        sd1.img2img(["a cat"], photo, strength=0.5, steps=4, seed=0)  # starts at step 2 of 4
        assert sorted(seen) == [(1, 2), (2, 2)]
    finally:
        sd1.on_step = None
    seen.clear()
    sd1.txt2img(["a cat"], steps=3, seed=0)  # the same compiled loop, now with no callback
    assert seen == []


def test_vae_tiling_switch(sd1):
    z = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32)  # 2x the fixture's 8x8 tile
    auto, off = sd1.decode(z, safe=False), sd1.decode(z, tiled=False, safe=False)
    on = sd1.decode(z, tiled=True, safe=False)
    assert np.array_equal(auto, off)  # auto tiles only beyond twice the native tile
    assert np.abs(on - off).max() > 1e-3  # tiles blend their seams
    assert np.array_equal(sd1.decode(z[:, :8, :8], tiled=True, safe=False), sd1.decode(z[:, :8, :8], safe=False))


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_guidance_rescale_and_clip_skip_reach_img2img_and_inpaint(sd1, photo, mode):
    mask = np.zeros((64, 64, 1), np.float32)
    mask[16:48, 16:48] = 1
    args = (photo,) if mode == "img2img" else (photo, mask)
    run = lambda **kw: getattr(sd1, mode)(["a cat"], *args, steps=4, seed=0, **kw)[0]  # noqa: E731
    base = run()
    assert np.abs(run(guidance_rescale=0.7) - base).max() > 1e-4
    assert np.abs(run(clip_skip=1) - base).max() > 1e-4


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda p, img: p.txt2img(["a"], steps=0), "steps must be a positive integer, got 0"),
        (lambda p, img: p.txt2img(["a"], steps=-1), "got -1"),
        (lambda p, img: p.txt2img(["a"], steps=3, guidance_scale=float("nan")), "guidance_scale must be a finite"),
        (lambda p, img: p.img2img(["a"], img * 255), "pass floats in [0, 1]"),
        (lambda p, img: p.inpaint(["a"], img, np.full((64, 64, 1), 255.0)), "mask values span [255, 255]"),
        (lambda p, img: p.denoise(["a"], img[..., 0]), "pass [H, W, C] or [N, H, W, C]"),
        (lambda p, img: p.progression("a", at=[0, 9], steps=4), "progression steps [0, 9]"),
    ],
)
def test_api_refuses_bad_numbers_and_images(sd1, photo, call, words):
    with pytest.raises(ValueError) as e:
        call(sd1, photo)
    assert words in str(e.value)


def test_should_stop_skips_the_remaining_steps_of_the_running_loop(sd1):
    """The server's interrupt: once ``should_stop`` says True, no more steps run (no progress, the latents stay)."""
    from sd_jax.pipelines.loop import Options

    seen, asked = [], []
    sd1.on_step = lambda i, n: seen.append(i)
    sd1.should_stop = lambda: asked.append(1) or len(asked) > 2  # says stop before the third step
    try:
        key = jax.random.key(3)
        noise = jax.random.normal(key, (1, 8, 8, 4))
        cond, uncond = sd1.conditioning(["a cat"], [""], 7.5, 64, 64)
        stopped, _ = sd1.latents(noise, cond, uncond, key=key, opts=Options(sampler="euler_a", steps=6))
        stopped = np.asarray(stopped)
        assert sorted(seen) == [1, 2] and len(asked) == 6  # asked before every step, stepped twice
    finally:
        sd1.on_step = sd1.should_stop = None
    two, _ = sd1.latents(noise, cond, uncond, key=key, opts=Options(sampler="euler_a", steps=6, end=2))
    six, _ = sd1.latents(noise, cond, uncond, key=key, opts=Options(sampler="euler_a", steps=6))
    np.testing.assert_allclose(stopped, np.asarray(two), atol=1e-6)  # where step 2 left it
    assert np.abs(np.asarray(six) - np.asarray(two)).max() > 1e-2
