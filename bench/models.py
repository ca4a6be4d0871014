"""The models every contender loads: random-weight diffusers folders written once, and their shapes.

- ``sd15``: the SD 1.5 architecture (``sd_jax/model_configs/sd15``), random weights, DDIM scheduler.
- ``sdxl``: the SDXL base architecture (``sd_jax/model_configs/sdxl_base``), random weights, its Euler scheduler.
- ``tiny``: the test fixture's tiny SD1-like architecture (``tests/fixtures/sd1``), with the U-Net widened
  to channels (32, 64) and 32 norm groups, because diffusers' Flax U-Net hard-codes 32 groups and cannot
  load the fixture itself. Same tokenizer and text encoder as the fixture.

Weights are numpy draws at initializer scale (``bench/workers/random_weights.py``), written with
``sd_jax.loading.export`` (no torch needed).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pathlib

from bench.harness import REPO

FIXTURE = REPO / "tests" / "fixtures" / "sd1"
SD15_CONFIGS = REPO / "sd_jax" / "model_configs" / "sd15"
TINY_UNET = {"block_out_channels": [32, 64], "norm_num_groups": 32}
FORMAT = 2  # bump when the folders' contents change


@dataclasses.dataclass(frozen=True)
class Size:
    """Shapes of one benchmark size."""

    name: str
    configs: pathlib.Path
    unet_overrides: dict
    image_size: int  # txt2img side in pixels
    steps: int  # txt2img steps

    @property
    def unet_config(self) -> dict:
        cfg = json.loads((self.configs / "unet" / "config.json").read_text())
        return {**cfg, **self.unet_overrides}

    @property
    def latent_size(self) -> int:
        return self.unet_config["sample_size"]

    @property
    def context(self) -> tuple[int, int]:
        text = json.loads((self.configs / "text_encoder" / "config.json").read_text())
        return text.get("max_position_embeddings", 77), self.unet_config["cross_attention_dim"]


SD15 = Size("sd15", SD15_CONFIGS, {}, image_size=512, steps=3)
SDXL = Size("sdxl", REPO / "sd_jax" / "model_configs" / "sdxl_base", {}, image_size=1024, steps=30)
TINY = Size("tiny", FIXTURE, TINY_UNET, image_size=32, steps=3)
TINY_XL = Size("tiny_xl", REPO / "tests" / "fixtures" / "sdxl", {}, image_size=64, steps=2)  # the SDXL test fixture


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SD_JAX_BENCH_CACHE", pathlib.Path.home() / ".cache" / "sd_jax" / "bench"))


def folder(size: Size, log=print) -> pathlib.Path:
    """The random-weight diffusers folder of ``size``, written on first use."""
    out = cache_root() / f"{size.name}_random"
    marker = out / ".complete"
    if marker.exists() and marker.read_text() == str(FORMAT):
        return out
    log(f"writing random-weight {size.name} pipeline to {out} (once)")
    # in a child process: Linux carries a process's peak RSS into the workers it forks later (ru_maxrss survives
    # exec), so writing gigabytes here would inflate every peak-memory reading of this run (family e)
    child = multiprocessing.get_context("spawn").Process(target=write_random_folder, args=(size, out))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"writing the random-weight {size.name} pipeline failed (exit {child.exitcode})")
    marker.write_text(str(FORMAT))
    return out


def write_random_folder(size: Size, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    from bench.workers.random_weights import random_like
    from sd_jax.loading.diffusers import Checkpoint, read_json
    from sd_jax.loading.export import save_checkpoint
    from sd_jax.models import clip, unet, vae

    ucfg = unet.UNetConfig.from_diffusers_config(size.unet_config)
    vcfg = vae.VAEConfig.from_diffusers_config(read_json(size.configs / "vae" / "config.json"))
    tcfg = clip.CLIPTextConfig.from_diffusers_config(read_json(size.configs / "text_encoder" / "config.json"))
    models = {
        "unet": (ucfg, random_like(unet.abstract_params(ucfg), seed)),
        "vae": (vcfg, random_like(vae.abstract_params(vcfg), seed + 1)),
        "text_encoder": (tcfg, random_like(clip.abstract_params(tcfg), seed + 2)),
    }
    index = {k: v for k, v in read_json(size.configs / "model_index.json").items()
             if k not in ("safety_checker", "feature_extractor")}  # fmt: skip
    if (size.configs / "text_encoder_2").is_dir():  # SDXL: the second encoder, and the folder's own scheduler
        t2 = clip.CLIPTextConfig.from_diffusers_config(read_json(size.configs / "text_encoder_2" / "config.json"))
        models["text_encoder_2"] = (t2, random_like(clip.abstract_params(t2), seed + 3))
        scheduler = read_json(size.configs / "scheduler" / "scheduler_config.json")
    else:
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
        index["requires_safety_checker"] = False
        scheduler = read_json(FIXTURE / "scheduler" / "scheduler_config.json")  # SD 1.5's DDIM settings
    save_checkpoint(out, Checkpoint(size.configs, index, models, scheduler))
    return out
