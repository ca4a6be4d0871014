"""diffusers' ControlNet pipelines on the tiny fixtures: the reference images of tests/test_controlnet_pipelines.py.

Needs the reference extra. Runs ``StableDiffusionControlNetPipeline``, ``StableDiffusionControlNetImg2ImgPipeline``,
``StableDiffusionControlNetInpaintPipeline`` (the 9-channel tests/fixtures/inpaint U-Net and the 4-channel sd1 one)
and ``StableDiffusionXLControlNetPipeline`` with the ControlNets of tests/fixtures/controlnet (built by
tools/make_controlnet_fixtures.py) for DDIM, Euler and DPM++ 2M, one and two nets, per-net scales, guess mode and
control_guidance_start/end, from the same initial latents as ours (``latents=``, and img2img's noise through
``randn_tensor``; the VAE posterior mean in place of its sample, as tests/test_pipelines.py does).

The .npz is self-describing: ``cases`` (JSON, one entry per case: what to run and with which inputs), the inputs
(``input/*``: noise, control images, the photo and mask) and each case's images (``image/<case>``, NHWC, uint16
of [0, 1]).

    python tools/make_controlnet_pipeline_fixtures.py
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "reference" / "controlnet_pipelines.npz"
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red circle on a blue background"]
CLASSES = {
    "txt2img": "StableDiffusionControlNetPipeline",
    "img2img": "StableDiffusionControlNetImg2ImgPipeline",
    "inpaint": "StableDiffusionControlNetInpaintPipeline",
    "sdxl": "StableDiffusionXLControlNetPipeline",
}
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def case(name, mode, base, nets, sampler, controls, noise, **kw):
    return {"name": name, "mode": mode, "base": base, "nets": nets, "sampler": sampler, "controls": controls,
            "noise": noise, "steps": 5, "guidance_scale": 7.0, "scale": 1.0, "start": 0.0, "end": 1.0,
            "guess": False, "prompts": PROMPTS[:1], **kw}  # fmt: skip


CASES = [
    *[
        case(
            f"txt2img_{s}",
            "txt2img",
            "sd1",
            ["sd1"],
            s,
            ["edges"],
            "n2",
            scale=0.8,
            prompts=PROMPTS,
            negative=["blurry", ""],
        )
        for s in SCHEDULERS
    ],  # fmt: skip
    case("txt2img_resized", "txt2img", "sd1", ["sd1"], "euler", ["shape_48x40"], "n1", height=32, width=32),
    case(
        "txt2img_multi",
        "txt2img",
        "sd1",
        ["sd1", "sd1_b"],
        "euler",
        ["edges", "soft"],
        "n1",
        scale=[0.7, 1.3],
        start=[0.0, 0.2],
        end=[0.6, 1.0],
    ),  # fmt: skip
    case("txt2img_guess", "txt2img", "sd1", ["sd1"], "dpmpp_2m", ["edges"], "n1", guess=True),
    case("txt2img_window", "txt2img", "sd1", ["sd1"], "ddim", ["soft"], "n1", start=0.2, end=0.6),
    *[
        case(f"img2img_{s}", "img2img", "sd1", ["sd1"], s, ["edges"], "n1", strength=0.7, end=0.7, scale=0.9)
        for s in SCHEDULERS
    ],  # fmt: skip
    *[case(f"inpaint9_{s}", "inpaint", "inpaint", ["sd1"], s, ["edges"], "n1") for s in ("ddim", "euler")],
    *[case(f"inpaint4_{s}", "inpaint", "sd1", ["sd1"], s, ["soft"], "n1", scale=0.8) for s in ("euler", "dpmpp_2m")],
    *[case(f"sdxl_{s}", "sdxl", "sdxl", ["sdxl"], s, ["edges"], "n1", guidance_scale=5.0) for s in SCHEDULERS],
    case("sdxl_guess", "sdxl", "sdxl", ["sdxl"], "euler", ["soft"], "n1", guidance_scale=5.0, guess=True),
]


def inputs() -> dict[str, np.ndarray]:
    """Fixed inputs, shared by us and diffusers: noise NHWC, 8-bit control images, a photo and a mask."""
    from PIL import Image
    from skimage import data

    from sd_jax.control_image import canny

    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((32, 32), Image.LANCZOS), np.float32) / 255.0
    shape = np.zeros((48, 40, 3), np.uint8)
    yy, xx = np.mgrid[:48, :40]
    shape[(yy - 20) ** 2 + (xx - 22) ** 2 < 12**2] = 255
    soft = np.clip(0.5 + 0.5 * np.sin(yy[:32, :32, None] / 3.0 + np.arange(3)) * np.cos(xx[:32, :32, None] / 5.0), 0, 1)
    mask = np.zeros((32, 32, 1), np.float32)
    mask[8:24, 10:26] = 1.0
    return {
        "input/n1": rng.standard_normal((1, 8, 8, 4)).astype(np.float32),
        "input/n2": rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        "input/edges": (canny(data.astronaut()[::16, ::16]) * 255).astype(np.uint8),
        "input/shape_48x40": shape,
        "input/soft": np.round(soft * 255).astype(np.uint8),
        "input/photo": photo,
        "input/mask": mask,
    }


def run(c: dict, inp: dict) -> np.ndarray:
    import diffusers
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as img2img_mod
    import torch
    from PIL import Image

    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))  # noqa: E731
    nets = [diffusers.ControlNetModel.from_pretrained(FIXTURES / "controlnet" / n) for n in c["nets"]]
    extra = {} if c["mode"] == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, CLASSES[c["mode"]]).from_pretrained(
        FIXTURES / c["base"], controlnet=nets if len(nets) > 1 else nets[0], **extra
    )
    pipe.scheduler = getattr(diffusers, SCHEDULERS[c["sampler"]]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    sf = vae.config.scaling_factor
    mean = lambda x: vae.encode(x).latent_dist.mean * sf  # noqa: E731
    controls = [Image.fromarray(inp[f"input/{k}"]) for k in c["controls"]]
    kw = dict(
        num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"], output_type="np",
        controlnet_conditioning_scale=c["scale"], control_guidance_start=c["start"], control_guidance_end=c["end"],
        guess_mode=c["guess"], negative_prompt=c.get("negative"),
    )  # fmt: skip
    noise = inp[f"input/{c['noise']}"]
    control = controls if len(controls) > 1 else controls[0]
    with torch.no_grad():
        if c["mode"] in ("txt2img", "sdxl"):
            return pipe(c["prompts"], image=control, latents=nchw(noise), height=c.get("height"),
                        width=c.get("width"), **kw).images  # fmt: skip
        photo = inp["input/photo"][None]
        if c["mode"] == "img2img":
            z0 = mean(nchw(photo) * 2 - 1)
            orig = img2img_mod.randn_tensor
            img2img_mod.randn_tensor = lambda shape, **_: nchw(noise)
            try:
                return pipe(c["prompts"], image=z0, control_image=control, strength=c["strength"], **kw).images
            finally:
                img2img_mod.randn_tensor = orig
        pipe._encode_vae_image = lambda image, generator: mean(image)
        return pipe(c["prompts"], image=nchw(photo), mask_image=nchw(inp["input/mask"][None]), control_image=control,
                    latents=nchw(noise), height=32, width=32, **kw).images  # fmt: skip


def main() -> None:
    import torch

    torch.set_num_threads(1)
    inp = inputs()
    out = dict(inp)
    for c in CASES:
        img = np.asarray(run(c, inp), np.float32)
        out[f"image/{c['name']}"] = np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)
        print(f"{c['name']}: {img.shape}")
    out["cases"] = np.asarray(json.dumps(CASES))
    np.savez_compressed(OUT, **out)
    print(f"{OUT}: {len(CASES)} cases, {OUT.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
