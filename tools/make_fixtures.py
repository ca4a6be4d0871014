"""Build the tiny test fixtures and their PyTorch reference outputs.

Needs the reference extra (``pip install -e ".[reference]"``). For each variant
it builds small, randomly initialized diffusers/transformers PyTorch models,
saves them as a diffusers folder under ``tests/fixtures/<variant>/`` and runs
them on fixed inputs, storing the outputs in
``tests/fixtures/reference/<variant>.npz``. The default test suite compares our
Flax models against these files without importing torch.

    python tools/make_fixtures.py            # all variants
    python tools/make_fixtures.py sd1 sdxl   # some

Images in the ``.npz`` are NCHW, as PyTorch produced them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tools"))

import build_vocab  # noqa: E402

TINY_MERGES = 600
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red circle on a blue background"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norms at 1/0; nudge every parameter so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def write_tokenizer(folder: pathlib.Path, pad: str) -> None:
    """A valid CLIP tokenizer with the first ``TINY_MERGES`` merges of the real vocabulary."""
    lines = (ROOT / "sd_jax" / "tokenizer_files" / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line][:TINY_MERGES]
    vocab, merge_lines = build_vocab.build(merges)
    build_vocab.write(folder, vocab, merge_lines)
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad,
                "unk_token": "<|endoftext|>",
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad,
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )


def vocab_size() -> int:
    return 2 * 256 + TINY_MERGES + 2


def text_encoder(seed: int, *, act: str, projection: int | None, hidden: int = 32, layers: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    n = vocab_size()
    cfg = CLIPTextConfig(
        vocab_size=n,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=n - 2,
        eos_token_id=n - 1,
        pad_token_id=n - 1,
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    _perturb(model, seed)
    return model.eval()


def vae(seed: int, *, scaling: float, blocks=(8, 16, 16), latent: int = 4, force_upcast: bool = True):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks),
        block_out_channels=list(blocks),
        layers_per_block=1,
        latent_channels=latent,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling,
        force_upcast=force_upcast,
    )
    _perturb(model, seed)
    return model.eval()


def unet(seed: int, **cfg):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    base = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    base.update(cfg)
    model = UNet2DConditionModel(**base)
    _perturb(model, seed)
    return model.eval()


def safety_checker(seed: int):
    """A tiny StableDiffusionSafetyChecker; thresholds of 1.0 make it flag nothing unless a test lowers them."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        projection_dim=12,
    )
    model = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(1.0)
        model.special_care_embeds_weights.fill_(1.0)
    _perturb(model, seed)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


def scheduler(**cfg):
    from diffusers import DDIMScheduler

    base = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    base.update(cfg)
    return DDIMScheduler(**base)


# -- reference outputs --


def ids_for(folder: pathlib.Path, sub: str) -> np.ndarray:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / sub)
    return tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


@torch.no_grad()
def text_reference(model, ids: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    ref = {
        f"{prefix}/input_ids": ids.astype(np.int32),
        f"{prefix}/last_hidden_state": out.last_hidden_state.numpy(),
        f"{prefix}/penultimate": out.hidden_states[-2].numpy(),
    }
    if hasattr(out, "text_embeds"):
        ref[f"{prefix}/text_embeds"] = out.text_embeds.numpy()
    else:
        ref[f"{prefix}/pooler_output"] = out.pooler_output.numpy()
    return ref


@torch.no_grad()
def vae_reference(model, seed: int, size: int = 32) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    post = model.encode(x).latent_dist
    z = torch.randn(post.mean.shape, generator=g)
    return {
        "vae/encode_input": x.numpy(),
        "vae/latent_mean": post.mean.numpy(),
        "vae/latent_logvar": post.logvar.numpy(),
        "vae/decode_input": z.numpy(),
        "vae/decoded": model.decode(z).sample.numpy(),
    }


@torch.no_grad()
def unet_reference(model, seed: int, context_dim: int, **extra) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.tensor([3.0, 815.5])  # a fractional timestep: the old Flax port cast these to int
    ctx = torch.randn(2, 5, context_dim, generator=g)
    kwargs, ref = {}, {}
    if "class_labels" in extra:
        kwargs["class_labels"] = extra["class_labels"]
        ref["unet/class_labels"] = extra["class_labels"].numpy()
    if cfg.addition_embed_type == "text_time":
        text_embeds = torch.randn(2, extra["pooled_dim"], generator=g)
        time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32], [64, 48, 4, 2, 32, 32]])
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        ref["unet/text_embeds"], ref["unet/time_ids"] = text_embeds.numpy(), time_ids.numpy()
    out = model(x, t, ctx, **kwargs).sample
    ref.update(
        {
            "unet/sample": x.numpy(),
            "unet/timestep": t.numpy(),
            "unet/encoder_hidden_states": ctx.numpy(),
            "unet/out": out.numpy(),
        }
    )
    return ref


# -- variants --


def save_pipeline(name: str, components: dict, pipeline_class: str, extra_index: dict | None = None) -> pathlib.Path:
    folder = FIXTURES / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    for sub, (library, obj) in components.items():
        if library == "tokenizer":  # written by write_tokenizer
            index[sub] = ["transformers", "CLIPTokenizer"]
        elif obj is None:
            index[sub] = [None, None]
        else:
            index[sub] = [library, type(obj).__name__.removesuffix("Pil")]
            obj.save_pretrained(folder / sub)
    index.update(extra_index or {})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def make_sd(name: str, *, v2: bool, inpaint: bool = False) -> dict[str, np.ndarray]:
    te = text_encoder(1, act="gelu" if v2 else "quick_gelu", projection=None)
    ae = vae(2, scaling=0.18215)
    kw = dict(in_channels=9) if inpaint else {}
    if v2:
        kw.update(use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True)
    un = unet(3, **kw)
    sched = scheduler(prediction_type="v_prediction" if v2 else "epsilon")
    folder = FIXTURES / name
    tok_dir = folder / "tokenizer"
    checker, processor = safety_checker(7) if name == "sd1" else (None, None)
    comps = {
        "text_encoder": ("transformers", te),
        "tokenizer": ("tokenizer", None),
        "vae": ("diffusers", ae),
        "unet": ("diffusers", un),
        "scheduler": ("diffusers", sched),
        "safety_checker": ("stable_diffusion", checker),
        "feature_extractor": ("transformers", processor),
    }
    cls = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
    save_pipeline(name, comps, cls, {"requires_safety_checker": checker is not None})
    write_tokenizer(tok_dir, "!" if v2 else "<|endoftext|>")
    ref = text_reference(te, ids_for(folder, "tokenizer"), "text_encoder")
    ref.update(vae_reference(ae, 4))
    ref.update(unet_reference(un, 5, 32))
    if name == "sd1":  # an fp16 variant beside the fp32 weights
        un.half().save_pretrained(folder / "unet", variant="fp16")
    if name == "sd2":  # sharded weights with an index file
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        un.save_pretrained(folder / "unet", max_shard_size="100KB")
    return ref


def make_sdxl() -> dict[str, np.ndarray]:
    from diffusers import EulerDiscreteScheduler

    te1 = text_encoder(1, act="quick_gelu", projection=None)
    te2 = text_encoder(6, act="gelu", projection=32)
    ae = vae(2, scaling=0.13025)
    un = unet(
        3,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4],
        transformer_layers_per_block=[1, 2],
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    comps = {
        "text_encoder": ("transformers", te1),
        "text_encoder_2": ("transformers", te2),
        "tokenizer": ("tokenizer", None),
        "tokenizer_2": ("tokenizer", None),
        "vae": ("diffusers", ae),
        "unet": ("diffusers", un),
        "scheduler": ("diffusers", sched),
    }
    folder = save_pipeline("sdxl", comps, "StableDiffusionXLPipeline", {"force_zeros_for_empty_prompt": True})
    write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    write_tokenizer(folder / "tokenizer_2", "!")
    ref = text_reference(te1, ids_for(folder, "tokenizer"), "text_encoder")
    ref.update(text_reference(te2, ids_for(folder, "tokenizer_2"), "text_encoder_2"))
    ref.update(vae_reference(ae, 4))
    ref.update(unet_reference(un, 5, 64, pooled_dim=32))
    return ref


def make_upscale() -> dict[str, np.ndarray]:
    from diffusers import DDPMScheduler

    te = text_encoder(1, act="gelu", projection=None)
    ae = vae(2, scaling=0.08333, blocks=(8, 16, 16), force_upcast=True)
    un = unet(
        3,
        in_channels=7,
        block_out_channels=[16, 16, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 2, 4],
        only_cross_attention=[True, True, False],
        use_linear_projection=True,
        num_class_embeds=1000,
    )
    sched = scheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    comps = {
        "text_encoder": ("transformers", te),
        "tokenizer": ("tokenizer", None),
        "vae": ("diffusers", ae),
        "unet": ("diffusers", un),
        "scheduler": ("diffusers", sched),
        "low_res_scheduler": ("diffusers", low_res),
    }
    folder = save_pipeline("upscale", comps, "StableDiffusionUpscalePipeline", {"max_noise_level": 350})
    write_tokenizer(folder / "tokenizer", "!")
    ref = text_reference(te, ids_for(folder, "tokenizer"), "text_encoder")
    ref.update(vae_reference(ae, 4))
    ref.update(unet_reference(un, 5, 32, class_labels=torch.tensor([20, 350])))
    return ref


VARIANTS = {
    "sd1": lambda: make_sd("sd1", v2=False),
    "sd2": lambda: make_sd("sd2", v2=True),
    "inpaint": lambda: make_sd("inpaint", v2=False, inpaint=True),
    "sdxl": make_sdxl,
    "upscale": make_upscale,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    (FIXTURES / "reference").mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        ref = VARIANTS[name]()
        np.savez_compressed(FIXTURES / "reference" / f"{name}.npz", **ref)
        print(f"{name}: {len(ref)} reference arrays")


if __name__ == "__main__":
    main()
