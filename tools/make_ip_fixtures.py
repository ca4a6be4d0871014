"""Build the tiny IP-Adapter fixtures and diffusers' reference outputs for them.

Writes, under ``tests/fixtures/ip_adapter/`` in the h94/IP-Adapter layout:

- ``models/image_encoder/``: a tiny random transformers ``CLIPVisionModelWithProjection`` (config.json +
  model.safetensors), its input size that of the ``sd1`` fixture's feature extractor (32);
- ``models/ip-adapter_sd15.safetensors`` (plain: ``image_proj.proj``/``norm``) and
  ``models/ip-adapter-plus_sd15.safetensors`` (Plus: the perceiver resampler), both with
  ``ip_adapter.<1, 3, ...>.to_k_ip/to_v_ip`` numbered as diffusers numbers the ``sd1`` U-Net's
  cross-attention processors;
- ``sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors``: Plus for the ``sdxl`` fixture, with the encoder of
  ``models/`` (as h94's ViT-H SDXL adapters);

and ``tests/fixtures/reference/ip_adapter.npz``: the encoder's preprocessed input, ``image_embeds`` and
``hidden_states[-2]`` of ``skimage.data.astronaut()`` (and of the zeros image), each adapter's projected tokens,
and diffusers pipeline images (``output_type="np"``, NHWC, fixed latents; sd1: DDIM, ``sdxl_*``: Euler) after
``load_ip_adapter`` + ``set_ip_adapter_scale``. Needs torch/diffusers/transformers (the reference extra):

    python tools/make_ip_fixtures.py
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "ip_adapter"
PROMPT = "a photo of an astronaut riding a horse on the moon"
STEPS, GUIDANCE, NEGATIVE = 4, 7.0, "blurry"
SCALES = {"plain": 0.6, "plus": 0.8}
FILES = {"plain": "ip-adapter_sd15.safetensors", "plus": "ip-adapter-plus_sd15.safetensors"}
SDXL_FILE = "ip-adapter-plus_sdxl_vit-h.safetensors"
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=24, hidden_act="gelu")  # fmt: skip
RESAMPLER = dict(hidden=16, heads=1, tokens=4, depth=4)  # heads = to_q rows // 64 in diffusers


def image_encoder(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init leaves norms at 1/0: nudge them so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(OUT / "models" / "image_encoder")
    return model


def _rand(g, *shape, scale=None):
    scale = scale if scale is not None else shape[-1] ** -0.5
    return (torch.randn(shape, generator=g) * scale).contiguous()


def _norm(g, prefix, dim):
    return {f"{prefix}.weight": 1 + _rand(g, dim, scale=0.1), f"{prefix}.bias": _rand(g, dim, scale=0.1)}


def attn_weights(g, unet) -> dict:
    """``ip_adapter.<key_id>.to_k_ip/to_v_ip`` for every cross-attention processor, diffusers' numbering."""
    out, key_id = {}, 1
    cross = unet.config.cross_attention_dim
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        if block == "mid_block":
            hidden = unet.config.block_out_channels[-1]
        elif block == "up_blocks":
            hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
        else:
            hidden = unet.config.block_out_channels[int(name.split(".")[1])]
        for kv in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{key_id}.{kv}.weight"] = _rand(g, hidden, cross, scale=0.3)
        key_id += 2
    return out


def plain_adapter(g, unet) -> dict:
    cross = unet.config.cross_attention_dim
    sd = {"image_proj.proj.weight": _rand(g, 4 * cross, VISION["projection_dim"]),
          "image_proj.proj.bias": _rand(g, 4 * cross, scale=0.1), **_norm(g, "image_proj.norm", cross)}  # fmt: skip
    return {**sd, **attn_weights(g, unet)}


def plus_adapter(g, unet) -> dict:
    cross, d, h = unet.config.cross_attention_dim, RESAMPLER["hidden"], RESAMPLER["heads"] * 64
    p = "image_proj."
    sd = {p + "latents": _rand(g, 1, RESAMPLER["tokens"], d, scale=d**-0.5),
          p + "proj_in.weight": _rand(g, d, VISION["hidden_size"]), p + "proj_in.bias": _rand(g, d, scale=0.1),
          p + "proj_out.weight": _rand(g, cross, d), p + "proj_out.bias": _rand(g, cross, scale=0.1),
          **_norm(g, p + "norm_out", cross)}  # fmt: skip
    for i in range(RESAMPLER["depth"]):
        q = f"{p}layers.{i}."
        sd.update(_norm(g, q + "0.norm1", d))
        sd.update(_norm(g, q + "0.norm2", d))
        sd[q + "0.to_q.weight"] = _rand(g, h, d)
        sd[q + "0.to_kv.weight"] = _rand(g, 2 * h, d)
        sd[q + "0.to_out.weight"] = _rand(g, d, h)
        sd.update(_norm(g, q + "1.0", d))
        sd[q + "1.1.weight"] = _rand(g, 4 * d, d)
        sd[q + "1.3.weight"] = _rand(g, d, 4 * d)
    return {**sd, **attn_weights(g, unet)}


def astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(data.astronaut(), np.uint8)


def sd1_references(enc, image) -> dict:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(FIXTURES / "sd1", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(12)
    for kind, make in (("plain", plain_adapter), ("plus", plus_adapter)):
        save_file(make(g, pipe.unet), OUT / "models" / FILES[kind])

    pixels = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    ref = {"pixels": pixels.numpy().transpose(0, 2, 3, 1)}
    with torch.no_grad():
        for name, x in (("image", pixels), ("zeros", torch.zeros_like(pixels))):
            out = enc(x, output_hidden_states=True)
            ref[f"{name}_embeds"] = out.image_embeds.numpy()
            ref[f"{name}_hidden"] = out.hidden_states[-2].numpy()
    noise = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ref["noise"] = noise
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    run = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               num_images_per_prompt=2, height=32, width=32, output_type="np")  # fmt: skip
    ref["plain_pipeline"] = pipe(**run, latents=latents.clone()).images
    for kind in ("plain", "plus"):
        pipe.load_ip_adapter(
            str(OUT), subfolder="models", weight_name=FILES[kind], image_encoder_folder="image_encoder"
        )
        pipe.set_ip_adapter_scale(SCALES[kind])
        with torch.no_grad():
            src = ref["image_hidden"] if kind == "plus" else ref["image_embeds"]
            proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
            ref[f"{kind}_tokens"] = proj(torch.from_numpy(src)).numpy()
        ref[f"{kind}_images"] = pipe(**run, latents=latents.clone(), ip_adapter_image=image).images
        pipe.unload_ip_adapter()
    return ref


def sdxl_references(image) -> dict:
    """IP-Adapter Plus for SDXL with the ViT-H encoder of ``models/`` (h94's ``ip-adapter-plus_sdxl_vit-h``)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionXLPipeline.from_pretrained(FIXTURES / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    (OUT / "sdxl_models").mkdir(exist_ok=True)
    save_file(plus_adapter(torch.Generator().manual_seed(13), pipe.unet), OUT / "sdxl_models" / SDXL_FILE)
    noise = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    pipe.load_ip_adapter(str(OUT), subfolder="sdxl_models", weight_name=SDXL_FILE,
                         image_encoder_folder="models/image_encoder")  # fmt: skip
    pipe.set_ip_adapter_scale(SCALES["plus"])
    images = pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2, height=32,
                  width=32, output_type="np", latents=latents, ip_adapter_image=image).images  # fmt: skip
    return {"sdxl_noise": noise, "sdxl_plus_images": images}


def main() -> None:
    from PIL import Image

    torch.set_num_threads(1)
    (OUT / "models").mkdir(parents=True, exist_ok=True)
    enc = image_encoder(11)
    image = Image.fromarray(astronaut())
    ref = {**sd1_references(enc, image), **sdxl_references(image)}
    (FIXTURES / "reference").mkdir(exist_ok=True)
    np.savez_compressed(FIXTURES / "reference" / "ip_adapter.npz", **ref)
    print({k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
    main()
