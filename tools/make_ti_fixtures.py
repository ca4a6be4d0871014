"""Build tiny textual-inversion embedding files and diffusers' prompt embeddings with them loaded.

Needs the reference extra (torch, diffusers, transformers) and the tiny pipelines of ``tools/make_fixtures.py``
(``tests/fixtures/sd1``, ``tests/fixtures/sdxl``). Writes every layout users have:

- ``sd1_emb.safetensors``: A1111/civitai ``{"emb_params": [2, 32]}`` (two vectors: tokens ``t``, ``t_1``);
- ``sd1_stp.pt``: A1111 pickle ``{"string_to_param": {"*": [1, 32]}, "name": ..., ...}``;
- ``sd1_diffusers/learned_embeds.safetensors``: diffusers ``{"<tiny-cat>": [32]}``;
- ``sd1_multi.safetensors``: diffusers ``{"<tri>": [3, 32]}`` (three vectors);
- ``sdxl_emb.safetensors``: SDXL ``{"clip_l": [2, 32], "clip_g": [2, 32]}``;

under ``tests/fixtures/embeddings/``, loads them with diffusers' ``load_textual_inversion`` and stores
``encode_prompt`` of prompts using the tokens (all files; only the ``.safetensors`` ones under ``sd1_safe/``)
in ``tests/fixtures/reference/textual_inversion.npz``.

    python tools/make_ti_fixtures.py
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "embeddings"
WIDTH = 32

# (file, token diffusers is told, token our loader finds by itself): A1111 files are named by their stem
SD1_FILES = (
    ("sd1_emb.safetensors", "sd1_emb"),
    ("sd1_stp.pt", "sd1_stp"),
    ("sd1_diffusers", "<tiny-cat>"),
    ("sd1_multi.safetensors", "<tri>"),
)
SD1_PROMPTS = [
    "a photo of sd1_emb on the moon",
    "sd1_stp riding a horse, <tiny-cat>",
    "a <tri> and a sd1_emb",
    "a red circle on a blue background",
]
SDXL_FILE, SDXL_TOKEN = "sdxl_emb.safetensors", "sdxl_emb"
SDXL_PROMPTS = ["a photo of sdxl_emb on the moon", "a red circle"]


def _vectors(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_files() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": _vectors(1, 2)}, OUT / "sd1_emb.safetensors")
    v = _vectors(2, 1)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "stp", "step": 100,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, OUT / "sd1_stp.pt")  # fmt: skip
    (OUT / "sd1_diffusers").mkdir(exist_ok=True)
    save_file({"<tiny-cat>": _vectors(3, 1)[0]}, OUT / "sd1_diffusers" / "learned_embeds.safetensors")
    save_file({"<tri>": _vectors(4, 3)}, OUT / "sd1_multi.safetensors")
    save_file({"clip_l": _vectors(5, 2), "clip_g": _vectors(6, 2)}, OUT / SDXL_FILE)


@torch.no_grad()
def sd1_reference(prefix: str, files, prompts) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(FIXTURES / "sd1", safety_checker=None, requires_safety_checker=False)
    for name, token in files:
        pipe.load_textual_inversion(str(OUT / name), token=token)
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompts, pipe.tokenizer), padding="max_length",
                         max_length=77, truncation=True, return_tensors="np").input_ids  # fmt: skip
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    return {f"{prefix}/prompts": np.asarray(prompts), f"{prefix}/input_ids": ids.astype(np.int32),
            f"{prefix}/context": embeds.numpy()}  # fmt: skip


@torch.no_grad()
def sdxl_reference() -> dict:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(FIXTURES / "sdxl")
    sd = load_file(OUT / SDXL_FILE)
    pipe.load_textual_inversion(sd["clip_l"], token=SDXL_TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(sd["clip_g"], token=SDXL_TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    embeds, _, pooled, _ = pipe.encode_prompt(SDXL_PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)  # fmt: skip
    return {"sdxl/prompts": np.asarray(SDXL_PROMPTS), "sdxl/context": embeds.numpy(),
            "sdxl/text_embeds": pooled.numpy()}  # fmt: skip


def main() -> None:
    write_files()
    safe = [f for f in SD1_FILES if not f[0].endswith(".pt")]  # what a test without torch can load
    ref = {**sd1_reference("sd1", SD1_FILES, SD1_PROMPTS),
           **sd1_reference("sd1_safe", safe, [p for p in SD1_PROMPTS if "sd1_stp" not in p]),
           **sdxl_reference()}  # fmt: skip
    np.savez_compressed(FIXTURES / "reference" / "textual_inversion.npz", **ref)
    for k, v in ref.items():
        print(k, v.shape, v.dtype)


if __name__ == "__main__":
    main()
