"""Pipelines against diffusers' PyTorch pipelines on the tiny fixtures (same initial latents), and the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.pipelines.pipeline import StableDiffusion

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red circle on a blue background"]
TOL = 2e-3  # max abs error on [0, 1] pixels


@pytest.fixture(scope="module")
def sd1(fixtures_dir_module):
    return StableDiffusion.load(fixtures_dir_module / "sd1")


@pytest.fixture(scope="module")
def fixtures_dir_module():
    from conftest import FIXTURES

    return FIXTURES


def unit_noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_latents(noise_nhwc):
    import torch

    return torch.from_numpy(np.ascontiguousarray(noise_nhwc.transpose(0, 3, 1, 2)))


def diffusers_pipe(cls_name, folder, sampler=None):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False) \
        if "Inpaint" in cls_name or cls_name == "StableDiffusionPipeline" or "Img2Img" in cls_name \
        else getattr(diffusers, cls_name).from_pretrained(folder)  # fmt: skip
    names = {
        "euler": "EulerDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
    }
    if sampler:
        pipe.scheduler = getattr(diffusers, names[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def report(name, ours, ref):
    err = float(np.abs(np.asarray(ours) - ref).max())
    print(f"{name}: max abs pixel err {err:.2e}")
    assert ours.shape == ref.shape
    assert err <= TOL
    return err


@pytest.mark.live
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_txt2img_matches_diffusers(variant, sampler, fixtures_dir):
    folder = fixtures_dir / variant
    pipe = StableDiffusion.load(folder)
    noise = unit_noise((2, 8, 8, 4))
    ours, _ = pipe.txt2img(PROMPTS, negative=["blurry", ""], steps=6, sampler=sampler, guidance_scale=7.0,
                           guidance_rescale=0.3 if variant == "sd2" else 0.0, noise=jnp.asarray(noise))  # fmt: skip
    ref = diffusers_pipe("StableDiffusionPipeline", folder, sampler)(
        PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=6, guidance_scale=7.0,
        guidance_rescale=0.3 if variant == "sd2" else 0.0, latents=torch_latents(noise), output_type="np",
        height=32, width=32,
    ).images  # fmt: skip
    report(f"txt2img {variant} {sampler}", ours, ref)


@pytest.mark.live
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_matches_diffusers(sampler, fixtures_dir):
    folder = fixtures_dir / "sdxl"
    pipe = StableDiffusion.load(folder)
    noise = unit_noise((2, 8, 8, 4), 1)
    ours, _ = pipe.txt2img(PROMPTS, steps=5, sampler=sampler, guidance_scale=5.0, noise=jnp.asarray(noise))
    ref = diffusers_pipe("StableDiffusionXLPipeline", folder, sampler)(
        PROMPTS, num_inference_steps=5, guidance_scale=5.0, latents=torch_latents(noise), output_type="np",
        height=32, width=32,
    ).images  # fmt: skip
    report(f"sdxl {sampler}", ours, ref)


def photo(size=32):
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS), np.float32) / 255.0


@pytest.mark.live
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(sampler, fixtures_dir, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as mod

    folder = fixtures_dir / "sd1"
    pipe = StableDiffusion.load(folder)
    image = photo()
    z0 = pipe.encode(image[None])  # the posterior mean, passed to both as 4-channel "image" latents
    noise = unit_noise((1, 8, 8, 4), 2)
    ours, _ = pipe.img2img(PROMPTS[:1], image, strength=0.6, steps=10, sampler=sampler, guidance_scale=6.0,
                           noise=jnp.asarray(noise), init_latents=z0)  # fmt: skip
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: torch_latents(noise))
    ref = diffusers_pipe("StableDiffusionImg2ImgPipeline", folder, sampler)(
        PROMPTS[:1], image=torch_latents(np.asarray(z0)), strength=0.6, num_inference_steps=10, guidance_scale=6.0,
        output_type="np",
    ).images  # fmt: skip
    report(f"img2img {sampler}", ours, ref)


@pytest.mark.live
@pytest.mark.parametrize("variant,sampler", [("inpaint", "ddim"), ("inpaint", "euler"), ("sd1", "euler"),
                                             ("sd1", "dpmpp_2m")])  # fmt: skip
def test_inpaint_matches_diffusers(variant, sampler, fixtures_dir, monkeypatch):
    import torch

    folder = fixtures_dir / variant
    pipe = StableDiffusion.load(folder)
    image = photo()
    mask = np.zeros((32, 32, 1), np.float32)
    mask[8:24, 10:26] = 1.0
    noise = unit_noise((1, 8, 8, 4), 3)
    z_img = pipe.encode(image[None])
    z_masked = pipe.encode((image * (1 - mask) + 0.5 * mask)[None])
    ours, _ = pipe.inpaint(PROMPTS[:1], image, mask, steps=8, sampler=sampler, guidance_scale=7.5,
                           noise=jnp.asarray(noise), image_latents=z_img, masked_image_latents=z_masked)  # fmt: skip
    ref_pipe = diffusers_pipe("StableDiffusionInpaintPipeline", folder, sampler)
    # diffusers samples the VAE posterior; make it take the mean, as we did.
    vae = ref_pipe.vae
    monkeypatch.setattr(
        ref_pipe, "_encode_vae_image", lambda image, generator: vae.encode(image).latent_dist.mean * 0.18215
    )
    ref = ref_pipe(
        PROMPTS[:1], image=torch.from_numpy(image.transpose(2, 0, 1)[None]),
        mask_image=torch.from_numpy(mask.transpose(2, 0, 1)[None]),
        num_inference_steps=8, guidance_scale=7.5, latents=torch_latents(noise), output_type="np", height=32, width=32,
    ).images  # fmt: skip
    report(f"inpaint {variant} {sampler}", ours, ref)


@pytest.mark.live
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_upscale_matches_diffusers(sampler, fixtures_dir, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as mod

    folder = fixtures_dir / "upscale"
    pipe = StableDiffusion.load(folder)
    low = photo(16)
    noise = unit_noise((1, 16, 16, 4), 4)
    img_noise = unit_noise((1, 16, 16, 3), 5)
    ours, _ = pipe.upscale(PROMPTS[:1], low, noise_level=20, steps=6, sampler=sampler, guidance_scale=9.0,
                           noise=jnp.asarray(noise), image_noise=jnp.asarray(img_noise))  # fmt: skip
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: torch_latents(img_noise))
    ref = diffusers_pipe("StableDiffusionUpscalePipeline", folder, sampler)(
        PROMPTS[:1], image=low[None], noise_level=20,
        num_inference_steps=6, guidance_scale=9.0, latents=torch_latents(noise), output_type="np",
    ).images  # fmt: skip
    report(f"upscale {sampler}", ours, ref)


# -- no torch needed --


def test_sharded_equals_single_device(sd1, fixtures_dir):
    from sd_jax.sharding import make_mesh

    noise = jnp.asarray(unit_noise((8, 8, 8, 4), 6))
    prompts = [PROMPTS[i % 2] for i in range(8)]
    single, _ = sd1.txt2img(prompts, steps=3, noise=noise)
    sharded = StableDiffusion.load(fixtures_dir / "sd1", mesh=make_mesh((-1, 1, 1)))
    assert sharded.mesh.devices.size == 8
    multi, _ = sharded.txt2img(prompts, steps=3, noise=noise)
    # Same numbers up to fp32 rounding: XLA picks kernels per local batch size (1 vs 8), so bits may differ.
    np.testing.assert_allclose(multi, single, atol=1e-5)
    micro, _ = sd1.txt2img(prompts, steps=3, noise=noise, micro_batch=2)
    np.testing.assert_allclose(micro, single, atol=1e-5)


def test_one_compile_per_options(sd1):
    sd1._compiled.clear()
    a, _ = sd1.txt2img(PROMPTS, steps=2, seed=0)
    b, _ = sd1.txt2img(PROMPTS[::-1], steps=2, seed=1)
    assert len(sd1._compiled) == 1 and a.shape == b.shape == (2, 32, 32, 3)
    fn = next(iter(sd1._compiled.values()))
    assert fn._cache_size() == 1
    sd1.txt2img(PROMPTS, steps=3)
    assert len(sd1._compiled) == 2


def test_guidance_scale_one_skips_uncond(sd1):
    sd1._compiled.clear()
    sd1.txt2img(PROMPTS[:1], steps=2, guidance_scale=1.0)
    (opts,) = sd1._compiled
    assert not opts.guidance


def test_modes_run_and_validate(sd1, fixtures_dir):
    img = photo()
    out, _ = sd1.img2img(PROMPTS[0], img, strength=0.5, steps=4)
    assert out.shape == (1, 32, 32, 3) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="strength must be in"):
        sd1.img2img(PROMPTS[0], img, strength=1.5)
    with pytest.raises(ValueError, match="multiples of 8"):
        sd1.txt2img(PROMPTS[0], height=36, width=32)
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        sd1.txt2img(PROMPTS[0], sampler="nope")
    with pytest.raises(ValueError, match="mask is 16x16 but the image is 32x32"):
        sd1.inpaint(PROMPTS[0], img, np.ones((16, 16, 1)))
    frames, _ = sd1.interpolate(PROMPTS[0], PROMPTS[1], frames=3, steps=2)
    assert frames.shape == (3, 32, 32, 3)
    grid, at = sd1.progression(PROMPTS[0], steps=4)
    assert grid.shape == (4, 32, 32, 3) and at == [0, 1, 2, 3]
    noisy = np.clip(img + 0.1 * np.random.default_rng(0).standard_normal(img.shape), 0, 1).astype(np.float32)
    restored, info = sd1.denoise(PROMPTS[0], noisy, steps=6)
    assert restored.shape == (1, 32, 32, 3) and info["noise_level"] > 0


def test_from_components_equals_load_sdxl(fixtures_dir):
    """The training side's path (components + params dict) conditions SDXL as loading does: text_embeds, time_ids."""
    from sd_jax import components

    loaded = StableDiffusion.load(fixtures_dir / "sdxl")
    comps, params = components.load(fixtures_dir / "sdxl")
    built = StableDiffusion.from_components(comps, params)
    assert built.is_sdxl and built.default_sampler == loaded.default_sampler
    cond, _ = built.conditioning(PROMPTS, None, 5.0, 32, 24)
    assert sorted(cond) == ["context", "text_embeds", "time_ids"]
    np.testing.assert_array_equal(cond["time_ids"], [[32, 24, 0, 0, 32, 24]] * 2)
    a, _ = loaded.txt2img(PROMPTS, steps=2, seed=3)
    b, _ = built.txt2img(PROMPTS, steps=2, seed=3)
    np.testing.assert_array_equal(a, b)
    built.set_params(jax.tree.map(lambda x: x * 0, params))
    c, _ = built.txt2img(PROMPTS, steps=2, seed=3)
    assert not np.array_equal(b, c)


def test_deprecated_names_still_work(sd1):
    """The old constructor, ``TextEncoders``, ``pipe.text`` and ``prompts.sdxl_*`` warn and keep working."""
    from sd_jax import components

    with pytest.warns(DeprecationWarning, match="TextEncoders"):
        from sd_jax.pipelines.prompts import TextEncoders
    with pytest.warns(DeprecationWarning, match="moved to sd_jax.components"):
        from sd_jax.pipelines.prompts import sdxl_time_ids
    assert sdxl_time_ids is components.sdxl_time_ids
    c = sd1.components
    text = TextEncoders(
        tokenizers=list(c.tokenizers), modules=list(c.text_encoders), params=[sd1.params["text_encoder"]]
    )
    with pytest.warns(DeprecationWarning, match="from_components"):
        old = StableDiffusion(unet=c.unet, vae=c.vae, text=text, schedule=c.schedule,
                              params={"unet": sd1.params["unet"], "vae": sd1.params["vae"]})  # fmt: skip
    new = StableDiffusion.from_components(old.components, old.params)
    np.testing.assert_array_equal(old.txt2img(PROMPTS, steps=2)[0], new.txt2img(PROMPTS, steps=2)[0])
    with pytest.warns(DeprecationWarning, match="pipe.text"):
        view = old.text
    view.params = [jax.tree.map(lambda x: x * 0, view.params[0])]
    assert not jnp.any(jax.tree.leaves(old.params["text_encoder"])[0])
