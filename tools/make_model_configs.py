"""Write the real architectures' config files into ``sd_jax/model_configs/``.

The values are those of the official Hugging Face repos (runwayml/stable-diffusion-v1-5,
runwayml/stable-diffusion-inpainting, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0, stabilityai/stable-diffusion-xl-refiner-1.0,
stabilityai/stable-diffusion-x4-upscaler);
they are serialized here through diffusers'/transformers' own config classes so the
files are exactly what ``from_pretrained`` reads. No weights are involved.

    python tools/make_model_configs.py
"""

from __future__ import annotations

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "sd_jax" / "model_configs"

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    layer_norm_eps=1e-5,
)
OPENCLIP_H = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    layer_norm_eps=1e-5,
)
OPENCLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    layer_norm_eps=1e-5,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=8,
    cross_attention_dim=768,
)


def diffusers_config(cls_name: str, **cfg) -> dict:
    """The full config diffusers writes for these arguments (defaults filled by the class itself)."""
    import diffusers
    import torch

    cls = getattr(diffusers, cls_name)
    if "Scheduler" in cls_name:
        obj = cls(**cfg)
    else:
        with torch.device("meta"):  # models are built without memory; only their config is kept
            obj = cls(**cfg)
    out = {"_class_name": cls_name, "_diffusers_version": diffusers.__version__}
    out.update({k: v for k, v in dict(obj.config).items() if not k.startswith("_")})
    return json.loads(json.dumps(out))


def clip_config(with_projection: bool, **cfg) -> dict:
    from transformers import CLIPTextConfig

    d = CLIPTextConfig(**cfg).to_dict()
    d["architectures"] = ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"]
    d.pop("transformers_version", None)
    return d


def tokenizer_config(pad: str) -> dict:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
        "do_lower_case": True,
    }


SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}


def sdxl_scheduler() -> tuple[str, str, dict]:
    """SDXL base's and refiner's scheduler (the same config in both repos)."""
    cfg = dict(
        SD_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False
    )
    return "diffusers", "EulerDiscreteScheduler", diffusers_config("EulerDiscreteScheduler", **cfg)


def write(name: str, pipeline: str, parts: dict[str, tuple[str, str, dict]], extra: dict | None = None) -> None:
    folder = OUT / name
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **(extra or {})}
    for sub, (library, cls, cfg) in parts.items():
        index[sub] = [library, cls]
        (folder / sub).mkdir(parents=True, exist_ok=True)
        fname = (
            "scheduler_config.json"
            if "scheduler" in sub
            else "tokenizer_config.json"
            if "tokenizer" in sub
            else "config.json"
        )
        (folder / sub / fname).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    print("wrote", folder)


def main() -> None:
    sd1_sched = diffusers_config(
        "PNDMScheduler", **SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    )
    for name, in_ch, pipe in (
        ("sd15", 4, "StableDiffusionPipeline"),
        ("sd15_inpaint", 9, "StableDiffusionInpaintPipeline"),
    ):
        write(
            name,
            pipe,
            {
                "text_encoder": ("transformers", "CLIPTextModel", clip_config(False, **CLIP_L)),
                "tokenizer": ("transformers", "CLIPTokenizer", tokenizer_config("<|endoftext|>")),
                "vae": ("diffusers", "AutoencoderKL", diffusers_config("AutoencoderKL", **SD_VAE)),
                "unet": (
                    "diffusers",
                    "UNet2DConditionModel",
                    diffusers_config("UNet2DConditionModel", **{**SD15_UNET, "in_channels": in_ch}),
                ),
                "scheduler": ("diffusers", "PNDMScheduler", sd1_sched),
            },
            {"requires_safety_checker": True},
        )
    write(
        "sd21",
        "StableDiffusionPipeline",
        {
            "text_encoder": ("transformers", "CLIPTextModel", clip_config(False, **OPENCLIP_H)),
            "tokenizer": ("transformers", "CLIPTokenizer", tokenizer_config("!")),
            "vae": ("diffusers", "AutoencoderKL", diffusers_config("AutoencoderKL", **{**SD_VAE, "sample_size": 768})),
            "unet": (
                "diffusers",
                "UNet2DConditionModel",
                diffusers_config(
                    "UNet2DConditionModel",
                    **{
                        **SD15_UNET,
                        "sample_size": 96,
                        "attention_head_dim": [5, 10, 20, 20],
                        "cross_attention_dim": 1024,
                        "use_linear_projection": True,
                        "upcast_attention": True,
                    },
                ),
            ),
            "scheduler": (
                "diffusers",
                "DDIMScheduler",
                diffusers_config(
                    "DDIMScheduler",
                    **SD_BETAS,
                    prediction_type="v_prediction",
                    clip_sample=False,
                    set_alpha_to_one=False,
                    steps_offset=1,
                ),
            ),
        },
    )
    write(
        "sdxl_base",
        "StableDiffusionXLPipeline",
        {
            "text_encoder": ("transformers", "CLIPTextModel", clip_config(False, **CLIP_L)),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", clip_config(True, **OPENCLIP_BIGG)),
            "tokenizer": ("transformers", "CLIPTokenizer", tokenizer_config("<|endoftext|>")),
            "tokenizer_2": ("transformers", "CLIPTokenizer", tokenizer_config("!")),
            "vae": ("diffusers", "AutoencoderKL", diffusers_config("AutoencoderKL", **SDXL_VAE)),
            "unet": (
                "diffusers",
                "UNet2DConditionModel",
                diffusers_config(
                    "UNet2DConditionModel",
                    sample_size=128,
                    in_channels=4,
                    out_channels=4,
                    block_out_channels=[320, 640, 1280],
                    layers_per_block=2,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    attention_head_dim=[5, 10, 20],
                    transformer_layers_per_block=[1, 2, 10],
                    cross_attention_dim=2048,
                    use_linear_projection=True,
                    addition_embed_type="text_time",
                    addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816,
                ),
            ),
            "scheduler": sdxl_scheduler(),
        },
        {"force_zeros_for_empty_prompt": True},
    )
    write_refiner()
    write(
        "sd_x4_upscaler",
        "StableDiffusionUpscalePipeline",
        {
            "text_encoder": ("transformers", "CLIPTextModel", clip_config(False, **OPENCLIP_H)),
            "tokenizer": ("transformers", "CLIPTokenizer", tokenizer_config("!")),
            "vae": (
                "diffusers",
                "AutoencoderKL",
                diffusers_config(
                    "AutoencoderKL",
                    **{
                        **SD_VAE,
                        "block_out_channels": [128, 256, 512],
                        "down_block_types": ["DownEncoderBlock2D"] * 3,
                        "up_block_types": ["UpDecoderBlock2D"] * 3,
                        "sample_size": 256,
                        "scaling_factor": 0.08333,
                    },
                ),
            ),
            "unet": (
                "diffusers",
                "UNet2DConditionModel",
                diffusers_config(
                    "UNet2DConditionModel",
                    sample_size=128,
                    in_channels=7,
                    out_channels=4,
                    block_out_channels=[256, 512, 512, 1024],
                    layers_per_block=2,
                    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                    up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
                    attention_head_dim=8,
                    cross_attention_dim=1024,
                    only_cross_attention=[True, True, True, False],
                    use_linear_projection=True,
                    num_class_embeds=1000,
                ),
            ),
            "scheduler": (
                "diffusers",
                "DDIMScheduler",
                diffusers_config(
                    "DDIMScheduler",
                    num_train_timesteps=1000,
                    beta_start=0.0001,
                    beta_end=0.02,
                    beta_schedule="scaled_linear",
                    prediction_type="v_prediction",
                    clip_sample=False,
                    set_alpha_to_one=False,
                    steps_offset=1,
                ),
            ),
            "low_res_scheduler": (
                "diffusers",
                "DDPMScheduler",
                diffusers_config(
                    "DDPMScheduler",
                    num_train_timesteps=1000,
                    beta_start=0.0001,
                    beta_end=0.02,
                    beta_schedule="scaled_linear",
                ),
            ),
        },
        {"max_noise_level": 350},
    )


def write_refiner() -> None:
    """stabilityai/stable-diffusion-xl-refiner-1.0: the bigG encoder alone, 5 time ids with the aesthetic score."""
    write(
        "sdxl_refiner",
        "StableDiffusionXLImg2ImgPipeline",
        {
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", clip_config(True, **OPENCLIP_BIGG)),
            "tokenizer_2": ("transformers", "CLIPTokenizer", tokenizer_config("!")),
            "vae": ("diffusers", "AutoencoderKL", diffusers_config("AutoencoderKL", **SDXL_VAE)),
            "unet": (
                "diffusers",
                "UNet2DConditionModel",
                diffusers_config("UNet2DConditionModel", **SDXL_REFINER_UNET),
            ),
            "scheduler": sdxl_scheduler(),
        },
        {
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
        },  # fmt: skip
    )


SDXL_REFINER_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=[384, 768, 1536, 1536],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[6, 12, 24, 24],
    transformer_layers_per_block=4,
    cross_attention_dim=1280,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)


if __name__ == "__main__":
    main()
