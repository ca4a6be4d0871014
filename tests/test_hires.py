"""Hires fix (sd_jax.pipelines.hires): the latent upscalers against torch's F.interpolate as A1111 calls it, A1111's
target sizes and second-pass steps, and each path's second pass equal to a plain img2img on the upscaled input."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from sd_jax.pipelines import hires, starts
from sd_jax.pipelines.pipeline import StableDiffusion


@pytest.fixture(scope="module")
def sd1(fixtures_dir_module):
    return StableDiffusion.load(fixtures_dir_module / "sd1", safety_checker=False)


@pytest.fixture(scope="module")
def fixtures_dir_module():
    import pathlib

    return pathlib.Path(__file__).parent / "fixtures"


LATENT = [k for k, u in hires.UPSCALERS.items() if u.mode is not None]


@pytest.mark.parametrize("name", LATENT)
@pytest.mark.parametrize("size", [(10, 14), (13, 9), (3, 4), (16, 21)])
def test_latent_upscalers_match_torch_interpolate(name, size):
    up = hires.UPSCALERS[name]
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 7)).astype(np.float32)  # NCHW, as A1111's samples
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=up.mode, antialias=up.antialias)
    got = np.asarray(hires.resize_latents(x.transpose(0, 2, 3, 1), size, up)).transpose(0, 3, 1, 2)
    assert got.shape == tuple(ref.shape)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_upscaler_names_are_a1111s():
    assert hires.get_upscaler("Latent (nearest-exact)") is hires.UPSCALERS["latent-nearest-exact"]
    assert hires.get_upscaler("latent").name == "Latent" and hires.UPSCALERS["latent"].mode == "bilinear"
    with pytest.raises(ValueError, match="unknown hires upscaler 'esrgan'"):
        hires.get_upscaler("esrgan")


def test_target_sizes_follow_a1111():
    assert hires.target_size(512, 512, scale=2).size == (1024, 1024)
    assert hires.target_size(512, 768, scale=1.5).size == (768, 1152)
    # one side given: the other keeps the aspect (integer division, as A1111)
    assert hires.target_size(768, 512, hires_width=1024).up == (1536, 1024)
    # both given: cover, then crop the latents to the centre (A1111's truncate_y = (1536 - 1024) // 8)
    t = hires.target_size(768, 512, hires_width=1024, hires_height=1024)
    assert (t.up, t.crop, t.size) == ((1536, 1024), (64, 0), (1024, 1024))
    with pytest.raises(ValueError, match=r"scale 1.3 turns 512x512 into 665.6x665.6, not multiples of 8 ; use "
                                         r"scale 1.296875 \(664x664\) or 1.3125 \(672x672\)"):  # fmt: skip
        hires.target_size(512, 512, scale=1.3)
    with pytest.raises(ValueError, match="multiples of 8"):  # the VAE factor 4 tiny models still need 8
        hires.target_size(32, 32, scale=1.1, factor=4)
    with pytest.raises(ValueError, match="hires width 1002 must be a positive multiple of 8 ; e.g. 1000"):
        hires.target_size(512, 512, hires_width=1002)


def test_second_pass_steps_are_a1111s_fixed_steps():
    # A1111 (setup_img2img_steps with explicit steps): a grid of int(N / min(d, 0.999)) steps, the last N sampled
    for steps, n, d, grid, start in [(20, 2, 0.5, 4, 2), (20, 10, 0.3, 33, 23), (20, 0, 1.0, 20, 0),
                                     (7, 0, 0.5, 14, 7), (30, 15, 0.7, 21, 6)]:  # fmt: skip
        sp = hires.second_pass(steps, n, d)
        assert (sp.steps, sp.start, sp.sampled) == (grid, start, n or steps)
        # ...which is where our img2img starts at that strength on that grid
        assert sp.steps - min(int(sp.steps * sp.strength), sp.steps) == start
    assert int(33 * 0.3) == 9  # why strength=denoise itself would run 9 of the 10 steps there
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            hires.second_pass(20, 0, bad)


def _first_pass_latents(pipe, prompts, **kw):
    return pipe.txt2img(prompts, output_type="latent", **kw)[0]


KW = dict(height=16, width=16, steps=2, guidance_scale=7.5)


def test_latent_path_equals_img2img_on_the_upscaled_latents(sd1):
    prompts, seed = ["a red circle", "a blue square"], 3
    images, info = sd1.hires_fix(prompts, scale=2, hires_steps=2, denoise=0.5, seed=seed, **KW)
    assert images.shape == (2, 32, 32, 3)
    assert (info["size"], info["grid_steps"], info["start_step"]) == ((32, 32), 4, 2)
    assert info["infotext"] == {"Hires upscale": 2, "Hires steps": 2, "Hires upscaler": "Latent",
                                "Denoising strength": 0.5}  # fmt: skip
    # the first pass is txt2img itself: its latents decode to txt2img's images
    z = _first_pass_latents(sd1, prompts, seed=seed, **KW)
    np.testing.assert_array_equal(sd1.decode(z), sd1.txt2img(prompts, seed=seed, **KW)[0])
    # A1111: F.interpolate(samples, size=(h // 8, w // 8), mode="bilinear", antialias=False)
    ref = torch.nn.functional.interpolate(torch.from_numpy(np.array(z).transpose(0, 3, 1, 2)), size=(8, 8),
                                          mode="bilinear", antialias=False).numpy().transpose(0, 2, 3, 1)  # fmt: skip
    zu = hires.resize_latents(z, (8, 8), "latent")
    assert float(np.abs(np.asarray(zu) - ref).max()) <= 1e-5
    # the second pass is the one generate path from img2img's start on those latents, seed reused
    key = jax.random.key(seed)
    grid = sd1._grid(None, 4)
    start = starts.img2img(sd1, key, 2, np.zeros((32, 32, 3), np.float32), grid, 0.5, init_latents=zu)
    assert start.step == 2
    want, _ = sd1.generate(start, prompts, steps=4, guidance_scale=7.5, key=jax.random.fold_in(key, 2))
    assert float(np.abs(images - want).max()) <= 1e-6
    # and not simply a txt2img at the large size
    assert float(np.abs(images - sd1.txt2img(prompts, seed=seed, **{**KW, "height": 32, "width": 32})[0]).max()) > 0.05


def test_lanczos_path_equals_plain_img2img_on_the_upscaled_image(sd1):
    prompts, seed = ["a red circle"], 5
    images, info = sd1.hires_fix(prompts, scale=2, hires_steps=2, denoise=0.5, seed=seed, upscaler="lanczos", **KW)
    assert info["infotext"]["Hires upscaler"] == "Lanczos"
    first, _ = sd1.txt2img(prompts, seed=seed, **KW)
    u8 = (255.0 * first[0]).astype(np.uint8)  # A1111 truncates to 8 bits before its PIL upscale
    up = np.asarray(Image.fromarray(u8).resize((32, 32), Image.LANCZOS), np.float32) / 255.0
    want, _ = sd1.img2img(prompts, up, strength=0.5, steps=4, seed=seed, guidance_scale=7.5)
    np.testing.assert_array_equal(images, want)
    latent, _ = sd1.hires_fix(prompts, scale=2, hires_steps=2, denoise=0.5, seed=seed, **KW)
    assert float(np.abs(images - latent).max()) > 0.01  # the latent path differs


def test_sdxl_hires_conditions_at_the_new_size(fixtures_dir_module):
    pipe = StableDiffusion.load(fixtures_dir_module / "sdxl", safety_checker=False)
    prompts, seed = ["a red circle"], 1
    images, info = pipe.hires_fix(prompts, hires_width=48, hires_height=32, hires_steps=2, denoise=0.5,
                                  upscaler="latent-nearest", seed=seed, **KW)  # fmt: skip
    assert images.shape == (1, 32, 48, 3) and info["infotext"]["Hires resize"] == "48x32"
    z = _first_pass_latents(pipe, prompts, seed=seed, **KW)
    f = pipe.vae_scale_factor
    zu = hires.resize_latents(z, (48 // f, 48 // f), "latent-nearest")[:, 2:-2]  # cover 48x48, crop to 32 rows
    want, _ = pipe.img2img(prompts, np.zeros((32, 48, 3), np.float32), init_latents=zu, strength=0.625, steps=4,
                           seed=seed, guidance_scale=7.5)  # fmt: skip
    assert float(np.abs(images - want).max()) <= 1e-6
    cond, _ = pipe.conditioning(prompts, None, 7.5, 32, 48)  # what img2img at 32x48 conditions on
    np.testing.assert_array_equal(np.asarray(cond["time_ids"])[0], [32, 48, 0, 0, 32, 48])


def test_bad_requests_are_refused_before_sampling(sd1):
    with pytest.raises(ValueError, match="turns 16x16 into 20.8x20.8"):
        sd1.hires_fix(["x"], scale=1.3, **KW)
    with pytest.raises(ValueError, match="record="):
        sd1.hires_fix(["x"], record=True, **KW)


def test_controlnet_arguments_reach_both_passes(fixtures_dir_module):
    pipe = StableDiffusion.load(fixtures_dir_module / "sd1", safety_checker=False,
                                controlnet=fixtures_dir_module / "controlnet" / "sd1")  # fmt: skip
    prompts, seed = ["a red circle"], 2
    edges = (np.random.default_rng(0).random((16, 16, 3)) > 0.5).astype(np.float32)
    ctl = dict(control_image=edges, controlnet_conditioning_scale=1.5)
    images, _ = pipe.hires_fix(prompts, scale=2, hires_steps=2, denoise=0.5, seed=seed, **KW, **ctl)
    z = _first_pass_latents(pipe, prompts, seed=seed, **KW, **ctl)
    zu = hires.resize_latents(z, (8, 8), "latent")
    want, _ = pipe.img2img(prompts, np.zeros((32, 32, 3), np.float32), init_latents=zu, strength=0.5, steps=4,
                           seed=seed, guidance_scale=7.5, **ctl)  # fmt: skip
    assert float(np.abs(images - want).max()) <= 1e-6
    plain, _ = pipe.hires_fix(prompts, scale=2, hires_steps=2, denoise=0.5, seed=seed, **KW)
    assert float(np.abs(images - plain).max()) > 1e-3  # the control acted
