"""The pipeline with the folder's scheduler config against diffusers' pipelines on the tiny fixtures: steps_offset
rewrite, the folder's own class and options, thresholding, Heun/PNDM latent-blend inpainting, VAE tiling,
guidance_rescale and clip_skip on img2img/inpaint."""

import json
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from test_pipelines import PROMPTS, diffusers_pipe, photo, report, torch_latents, unit_noise

from sd_jax.pipelines.pipeline import StableDiffusion


def folder_with(tmp_path, base, cls, **cfg):
    """A copy of fixture ``base`` whose scheduler is ``cls`` with ``cfg`` (model_index.json names it too)."""
    from conftest import FIXTURES

    dst = tmp_path / base
    shutil.copytree(FIXTURES / base, dst)
    sched = dst / "scheduler" / "scheduler_config.json"
    raw = json.loads(sched.read_text())
    sched.write_text(json.dumps({**raw, "_class_name": cls, **cfg}))
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def txt2img_both(path, steps=6, **kw):
    pipe = StableDiffusion.load(path)
    noise = unit_noise((2, 8, 8, 4))
    ours, _ = pipe.txt2img(PROMPTS, steps=steps, guidance_scale=7.0, noise=jnp.asarray(noise), **kw)
    ref = diffusers_pipe("StableDiffusionPipeline", path)(
        PROMPTS, num_inference_steps=steps, guidance_scale=7.0, latents=torch_latents(noise), output_type="np",
        height=32, width=32,
    ).images  # fmt: skip
    return ours, ref


def inpaint_both(path, sampler, monkeypatch, steps=8):
    import torch

    pipe = StableDiffusion.load(path)
    image = photo()
    mask = np.zeros((32, 32, 1), np.float32)
    mask[8:24, 10:26] = 1.0
    noise = unit_noise((1, 8, 8, 4), 3)
    z_img = pipe.encode(image[None])
    ours, _ = pipe.inpaint(PROMPTS[:1], image, mask, steps=steps, sampler=sampler, guidance_scale=7.5,
                           noise=jnp.asarray(noise), image_latents=z_img)  # fmt: skip
    ref_pipe = diffusers_pipe("StableDiffusionInpaintPipeline", path, None)
    if sampler is not None:
        import diffusers

        cls = {"heun": "HeunDiscreteScheduler", "pndm": "PNDMScheduler"}[sampler]
        ref_pipe.scheduler = getattr(diffusers, cls).from_config(ref_pipe.scheduler.config)
    vae = ref_pipe.vae
    monkeypatch.setattr(
        ref_pipe, "_encode_vae_image", lambda image, generator: vae.encode(image).latent_dist.mean * 0.18215
    )
    ref = ref_pipe(
        PROMPTS[:1], image=torch.from_numpy(image.transpose(2, 0, 1)[None]),
        mask_image=torch.from_numpy(mask.transpose(2, 0, 1)[None]),
        num_inference_steps=steps, guidance_scale=7.5, latents=torch_latents(noise), output_type="np", height=32,
        width=32,
    ).images  # fmt: skip
    return ours, ref


@pytest.mark.live
def test_steps_offset_zero_is_rewritten_as_diffusers(tmp_path, monkeypatch):
    path = folder_with(tmp_path, "sd1", "DDIMScheduler", steps_offset=0)
    with pytest.warns(FutureWarning, match="steps_offset"):
        ours, ref = txt2img_both(path)
    report("txt2img steps_offset 0", ours, ref)
    with pytest.warns(FutureWarning, match="steps_offset"):
        ours, ref = inpaint_both(path, None, monkeypatch)
    report("inpaint steps_offset 0", ours, ref)


@pytest.mark.live
@pytest.mark.parametrize(
    "cls,cfg",
    [
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}),
        (
            "DPMSolverMultistepScheduler",
            {
                "thresholding": True,
                "sample_max_value": 1.5,
                "final_sigmas_type": "sigma_min",
                "dynamic_thresholding_ratio": 0.9,
            },
        ),  # fmt: skip
        ("DPMSolverMultistepScheduler", {"solver_type": "heun", "use_exponential_sigmas": True}),
        ("UniPCMultistepScheduler", {"use_beta_sigmas": True}),
        ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
        ("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.9}),
        ("HeunDiscreteScheduler", {"clip_sample": True, "clip_sample_range": 2.0}),
        ("LMSDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ],
)
def test_default_sampler_is_the_folders_scheduler_with_its_options(tmp_path, cls, cfg):
    path = folder_with(tmp_path, "sd1", cls, **cfg)
    assert StableDiffusion.load(path).scheduler.class_name == cls  # (stochastic samplers: the sampler path)
    ours, ref = txt2img_both(path)
    report(f"txt2img default sampler {cls} {cfg}", ours, ref)


@pytest.mark.live
@pytest.mark.parametrize("sampler", ["heun", "pndm"])
def test_4_channel_inpaint_blends_every_sub_step(tmp_path, sampler, monkeypatch):
    # diffusers' PNDM default runs PRK warm-up steps, which we refuse: the folder says skip_prk_steps
    path = folder_with(tmp_path, "sd1", "DDIMScheduler", skip_prk_steps=True)
    ours, ref = inpaint_both(path, sampler, monkeypatch)
    report(f"inpaint sd1 {sampler}", ours, ref)


@pytest.mark.live
@pytest.mark.parametrize("tiled", [True, False])
def test_vae_tiling_matches_diffusers(tiled, fixtures_dir):
    pipe = StableDiffusion.load(fixtures_dir / "sd1")
    z = unit_noise((1, 16, 16, 4), 9)  # 64 px: twice the fixture VAE's 32 px tile
    ours = pipe.decode(jnp.asarray(z), tiled=tiled, safe=False)
    ref_pipe = diffusers_pipe("StableDiffusionPipeline", fixtures_dir / "sd1")
    if tiled:
        ref_pipe.vae.enable_tiling()
    import torch

    with torch.no_grad():
        x = ref_pipe.vae.decode(torch_latents(z) / ref_pipe.vae.config.scaling_factor).sample
    ref = np.clip(x.numpy().transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    report(f"decode tiled={tiled}", ours, ref)


def _rescale_like_txt2img(ref_pipe, rescale, monkeypatch):
    """diffusers' img2img/inpaint pipelines have no guidance_rescale: apply StableDiffusionPipeline's
    ``rescale_noise_cfg`` to the guided output before each scheduler step, as its txt2img loop does."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    last = {}
    forward, step = ref_pipe.unet.forward, ref_pipe.scheduler.step

    def unet_forward(*a, **k):
        out = forward(*a, **k)
        last["text"] = out[0].chunk(2)[1]
        return out

    def guided_step(noise_pred, t, x, *a, **k):
        return step(rescale_noise_cfg(noise_pred, last["text"], guidance_rescale=rescale), t, x, *a, **k)

    monkeypatch.setattr(ref_pipe.unet, "forward", unet_forward)
    monkeypatch.setattr(ref_pipe.scheduler, "step", guided_step)


def _embeds_with_clip_skip(ref_pipe, prompts, clip_skip):
    """SD 1.x clip skip from transformers' hidden states: the final layer norm on ``clip_skip`` layers before the
    last (diffusers' own ``encode_prompt(clip_skip=)`` reaches for ``text_model``, which transformers 5 removed)."""
    import torch

    tok = ref_pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    te = ref_pipe.text_encoder
    with torch.no_grad():
        out = te(ids.input_ids, output_hidden_states=True)
        return te.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@pytest.mark.live
@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_take_guidance_rescale_and_clip_skip(mode, fixtures_dir, monkeypatch):
    """clip_skip on both prompts (ours, as A1111): diffusers given the negative embeddings with the same skip."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img_mod
    import torch

    folder = fixtures_dir / "sd1"
    pipe = StableDiffusion.load(folder)
    image = photo()
    z0 = pipe.encode(image[None])
    noise = unit_noise((1, 8, 8, 4), 2)
    mask = np.zeros((32, 32, 1), np.float32)
    mask[8:24, 10:26] = 1.0
    kw = dict(negative="blurry", steps=8, sampler="euler", guidance_scale=6.0, guidance_rescale=0.5, clip_skip=1,
              noise=jnp.asarray(noise))  # fmt: skip
    if mode == "img2img":
        ours, _ = pipe.img2img(PROMPTS[:1], image, strength=0.7, init_latents=z0, **kw)
        ref_pipe = diffusers_pipe("StableDiffusionImg2ImgPipeline", folder, "euler")
        monkeypatch.setattr(img_mod, "randn_tensor", lambda shape, **k: torch_latents(noise))
        call = dict(image=torch_latents(np.asarray(z0)), strength=0.7)
    else:
        ours, _ = pipe.inpaint(PROMPTS[:1], image, mask, image_latents=z0, **kw)
        ref_pipe = diffusers_pipe("StableDiffusionInpaintPipeline", folder, "euler")
        vae = ref_pipe.vae
        monkeypatch.setattr(ref_pipe, "_encode_vae_image",
                            lambda image, generator: vae.encode(image).latent_dist.mean * 0.18215)  # fmt: skip
        call = dict(image=torch.from_numpy(image.transpose(2, 0, 1)[None]), latents=torch_latents(noise),
                    mask_image=torch.from_numpy(mask.transpose(2, 0, 1)[None]), height=32, width=32)  # fmt: skip
    _rescale_like_txt2img(ref_pipe, 0.5, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ref_pipe(
            prompt_embeds=_embeds_with_clip_skip(ref_pipe, PROMPTS[:1], 1),
            negative_prompt_embeds=_embeds_with_clip_skip(ref_pipe, ["blurry"], 1), num_inference_steps=8,
            guidance_scale=6.0, output_type="np", **call,
        ).images  # fmt: skip
    report(f"{mode} guidance_rescale 0.5 clip_skip 1", ours, ref)
