"""The tiny SDXL refiner fixture and diffusers' SDXL img2img / inpaint / refiner reference images.

Needs the reference extra. Builds ``tests/fixtures/sdxl_refiner/`` (diffusers' refiner layout: ``text_encoder_2``
only, ``requires_aesthetics_score``, a U-Net with 5 time ids of ``addition_time_embed_dim`` 8 plus the pooled
text, the VAE of tests/fixtures/sdxl), its original-layout single file
``tests/fixtures/single_file/sdxl_refiner.safetensors`` (written by our ``save_single_file``, then read by
diffusers' ``from_single_file``: every tensor must equal the folder's), and runs diffusers'
``StableDiffusionXLImg2ImgPipeline`` (refiner, and the base as img2img), the base->refiner handoff (base
``denoising_end=0.8, output_type="latent"``, refiner ``denoising_start=0.8``) and
``StableDiffusionXLInpaintPipeline`` for Euler and DPM++ 2M from the same noise as ours (``latents=``, img2img's
noise through ``randn_tensor``; the VAE posterior mean in place of its sample, as tests/test_pipelines.py does).

The .npz is self-describing: ``cases`` (JSON), the inputs (``input/*``) and each case's images (``image/<case>``,
NHWC, uint16 of [0, 1]) and, for the handoff, the base's latents (``latents/<case>``, NHWC float32).

    python tools/make_refiner_fixtures.py            # folder, single file and references
    python tools/make_refiner_fixtures.py --single-file-only
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "reference" / "sdxl_refiner.npz"
SINGLE = FIXTURES / "single_file" / "sdxl_refiner.safetensors"
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red circle on a blue background"]
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def case(name, mode, sampler, **kw):
    return {"name": name, "mode": mode, "sampler": sampler, "steps": 10, "guidance_scale": 5.0,
            "prompts": PROMPTS[:1], "negative": None, **kw}  # fmt: skip


CASES = [
    *[case(f"refiner_img2img_{s}", "refiner_img2img", s, strength=0.6, negative=["blurry"]) for s in SCHEDULERS],
    case(
        "refiner_scores_euler",
        "refiner_img2img",
        "euler",
        strength=0.5,
        aesthetic_score=7.0,
        negative_aesthetic_score=1.5,
    ),  # fmt: skip
    *[case(f"handoff_{s}", "handoff", s, prompts=PROMPTS, split=0.8) for s in SCHEDULERS],
    case("handoff_07_euler", "handoff", "euler", split=0.7, steps=8),
    *[case(f"sdxl_img2img_{s}", "sdxl_img2img", s, strength=0.6) for s in SCHEDULERS],
    *[case(f"sdxl_inpaint_{s}", "sdxl_inpaint", s, steps=8) for s in SCHEDULERS],
]


def make_folder() -> pathlib.Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from diffusers import EulerDiscreteScheduler
    from make_fixtures import save_pipeline, text_encoder, unet, vae, write_tokenizer

    te2 = text_encoder(8, act="gelu", projection=32)
    ae = vae(2, scaling=0.13025)  # the base's VAE (same seed): the handoff shares the latent space
    un = unet(
        9,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4],
        transformer_layers_per_block=2,
        cross_attention_dim=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 5 * 8,
    )
    comps = {
        "text_encoder": ("transformers", None),
        "text_encoder_2": ("transformers", te2),
        "tokenizer": ("transformers", None),
        "tokenizer_2": ("tokenizer", None),
        "vae": ("diffusers", ae),
        "unet": ("diffusers", un),
        "scheduler": ("diffusers", EulerDiscreteScheduler.from_pretrained(FIXTURES / "sdxl" / "scheduler")),
    }
    index = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    folder = save_pipeline("sdxl_refiner", comps, "StableDiffusionXLImg2ImgPipeline", index)
    write_tokenizer(folder / "tokenizer_2", "!")
    return folder


def make_single_file(folder: pathlib.Path) -> int:
    """Our original-layout file, read back by diffusers' ``from_single_file``: the tensor count it reproduced."""
    import diffusers
    import torch

    sys.path.insert(0, str(ROOT))
    from sd_jax.loading.diffusers import load_checkpoint
    from sd_jax.loading.single_file import save_single_file

    save_single_file(SINGLE, load_checkpoint(folder), "sdxl_refiner")
    cls = diffusers.StableDiffusionXLImg2ImgPipeline
    ref = cls.from_pretrained(folder)
    theirs = cls.from_single_file(str(SINGLE), config=str(folder), local_files_only=True)
    n = 0
    for name in ("unet", "vae", "text_encoder_2"):
        a, b = getattr(ref, name).state_dict(), getattr(theirs, name).state_dict()
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
        assert sorted(a) == sorted(b), f"{name}: key sets differ"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
        n += len(a)
    assert theirs.text_encoder is None and theirs.config.requires_aesthetics_score
    return n


def inputs() -> dict[str, np.ndarray]:
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(16)
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((32, 32), Image.LANCZOS), np.float32) / 255.0
    mask = np.zeros((32, 32, 1), np.float32)
    mask[8:24, 10:26] = 1.0
    return {
        "input/n1": rng.standard_normal((1, 8, 8, 4)).astype(np.float32),
        "input/n2": rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        "input/photo": photo,
        "input/mask": mask,
    }


def _pipe(cls_name: str, folder: pathlib.Path, sampler: str):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(c: dict, inp: dict) -> tuple[np.ndarray, np.ndarray | None]:
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_mod
    import torch

    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))  # noqa: E731
    base, refiner = FIXTURES / "sdxl", FIXTURES / "sdxl_refiner"
    kw = dict(num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"], negative_prompt=c["negative"])
    photo = inp["input/photo"][None]
    with torch.no_grad():
        if c["mode"] == "handoff":
            first = _pipe("StableDiffusionXLPipeline", base, c["sampler"])
            n = inp["input/n2" if len(c["prompts"]) == 2 else "input/n1"]
            lat = first(c["prompts"], latents=nchw(n), height=32, width=32, denoising_end=c["split"],
                        output_type="latent", **kw).images  # fmt: skip
            second = _pipe("StableDiffusionXLImg2ImgPipeline", refiner, c["sampler"])
            img = second(c["prompts"], image=lat, denoising_start=c["split"], output_type="np", **kw).images
            return img, lat.numpy().transpose(0, 2, 3, 1)
        folder = refiner if c["mode"] == "refiner_img2img" else base
        if c["mode"] == "sdxl_inpaint":
            pipe = _pipe("StableDiffusionXLInpaintPipeline", folder, c["sampler"])
            vae = pipe.vae
            pipe._encode_vae_image = lambda image, generator: vae.encode(image).latent_dist.mean * 0.13025
            img = pipe(c["prompts"], image=nchw(photo), mask_image=nchw(inp["input/mask"][None]), strength=1.0,
                       latents=nchw(inp["input/n1"]), height=32, width=32, output_type="np", **kw).images  # fmt: skip
            return img, None
        pipe = _pipe("StableDiffusionXLImg2ImgPipeline", folder, c["sampler"])
        z0 = pipe.vae.encode(nchw(photo) * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        orig = img2img_mod.randn_tensor
        img2img_mod.randn_tensor = lambda shape, **_: nchw(inp["input/n1"])
        scores = {k: c[k] for k in ("aesthetic_score", "negative_aesthetic_score") if k in c}
        try:
            img = pipe(c["prompts"], image=z0, strength=c["strength"], output_type="np", **scores, **kw).images
        finally:
            img2img_mod.randn_tensor = orig
        return img, None


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--single-file-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = FIXTURES / "sdxl_refiner" if args.single_file_only else make_folder()
    n = make_single_file(folder)
    print(f"{SINGLE.name}: {SINGLE.stat().st_size} bytes; diffusers.from_single_file reproduced {n} tensors exactly")
    if not args.single_file_only:
        references()


def references() -> None:
    inp = inputs()
    out = dict(inp)
    for c in CASES:
        img, lat = run(c, inp)
        out[f"image/{c['name']}"] = np.round(np.clip(np.asarray(img, np.float32), 0, 1) * 65535).astype(np.uint16)
        if lat is not None:
            out[f"latents/{c['name']}"] = lat.astype(np.float32)
        print(f"{c['name']}: {img.shape}")
    out["cases"] = np.asarray(json.dumps(CASES))
    np.savez_compressed(OUT, **out)
    print(f"{OUT}: {len(CASES)} cases, {OUT.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
