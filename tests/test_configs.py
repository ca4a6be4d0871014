"""Every config in configs/, and every variant its docstring documents, as ``train.py`` loads it: the run settings,
the trainer's config check, and the models' parameter shapes from ``jax.eval_shape`` (nothing is allocated).

From-scratch configs build ``config.model`` (``scratch_model_configs``); a fine-tune builds the architecture its
``init_from`` names: the named variant (``UNetConfig.sd15()`` ...), checked against the real checkpoint's shipped
config.json, or the test fixture's config.json (``runlocal``). The parameter counts are those of the diffusers /
transformers / peft PyTorch models built from the same configs on torch's meta device (see test_full_size_maps.py).
"""

import dataclasses
import functools
import importlib
import pathlib
import re

import jax
import numpy as np
import pytest
from PIL import Image

from configs import common
from sd_jax.cli.train_config import apply_overrides, load_config
from sd_jax.loading.diffusers import read_json
from sd_jax.models import clip, lora, unet, vae
from sd_jax.training import checks
from sd_jax.training.checks import ConfigError, check_config, scratch_model_configs
from sd_jax.training.optim import freeze_labels

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
SHIPPED = ROOT / "sd_jax" / "model_configs"
NOT_RUNS = ("__init__", "common")  # configs/ files that are not a run's config


def documented_specs() -> list[str]:
    """``NAME`` and each ``NAME:ARG`` that a config's docstring runs (``--config configs/NAME.py:ARG``)."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.stem in NOT_RUNS:
            continue
        doc = importlib.import_module(f"configs.{path.stem}").__doc__ or ""
        assert f"configs/{path.stem}.py" in doc, f"{path.name}: the docstring shows no command that runs it"
        args = sorted(set(re.findall(rf"configs/{path.stem}\.py:(\S+)", doc)))
        out += [path.stem] + [f"{path.stem}:{a}" for a in args]
    return out


SPECS = documented_specs()


def load(spec: str, overrides=()):
    """The config as train.py builds it: ``--config configs/NAME.py[:ARG]`` plus ``--config.KEY=VALUE``."""
    name, _, arg = spec.partition(":")
    cfg = apply_overrides(load_config(str(CONFIG_DIR / f"{name}.py") + (f":{arg}" if arg else "")), list(overrides))
    cfg.lock()
    return cfg


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# -- run settings ---------------------------------------------------------------------------------------------------

SD15, SD21 = "runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD1_FIXTURE, SDXL_FIXTURE = str(ROOT / "tests" / "fixtures" / "sd1"), "tests/fixtures/sdxl"
EMBEDDED = str(ROOT / "sd_jax" / "default_model")
# spec: (trainer, train, init_from, steps, batch_size, data.source, data.image_size, compute_dtype, sharding)
RUNS = {
    "tiny": ("diffusion", ("unet",), None, 20, 8, "synthetic", 32, "float32", "dp"),
    "unet_text_scratch": ("diffusion", ("unet", "text_encoder"), None, 5000, 8, "synthetic", 32, "float32", "dp"),
    "vae_scratch": ("diffusion", ("vae",), None, 2000, 8, "synthetic", 32, "float32", "dp"),
    "shapes_vae": ("diffusion", ("vae",), None, 2500, 16, "shapes", 64, "float32", "dp"),
    "shapes_vae:runlocal": ("diffusion", ("vae",), None, 3, 8, "shapes", 64, "float32", "dp"),
    "shapes_vae_decoder": ("diffusion", ("vae",), None, 1000, 16, "shapes", 64, "float32", "dp"),
    "shapes_vae_decoder:runlocal": ("diffusion", ("vae",), None, 3, 8, "shapes", 64, "float32", "dp"),
    "shapes_unet": ("diffusion", ("unet", "text_encoder"), None, 7800, 32, "shapes", 64, "float32", "dp"),
    "shapes_unet:runlocal": ("diffusion", ("unet", "text_encoder"), None, 3, 8, "shapes", 64, "float32", "dp"),
    "sd15_finetune": ("diffusion", ("unet",), SD15, 20_000, 256, "folder", 512, "bfloat16", "dp"),
    "sd21_finetune": ("diffusion", ("unet",), SD21, 20_000, 256, "folder", 768, "bfloat16", "fsdp"),
    "sdxl_finetune": ("diffusion", ("unet",), SDXL, 20_000, 64, "folder", 1024, "bfloat16", "fsdp"),
    "sdxl_finetune:runlocal": ("diffusion", ("unet",), SDXL_FIXTURE, 10, 8, "synthetic", 32, "float32", "fsdp"),
    "lora": ("lora", ("unet",), SD15, 1000, 8, "folder", 512, "bfloat16", "dp"),
    "lora:runlocal": ("lora", ("unet",), SD1_FIXTURE, 10, 2, "synthetic", 32, "float32", "dp"),
    "dreambooth": ("lora", ("unet",), SD15, 400, 1, "dreambooth", 512, "bfloat16", "dp"),
    "dreambooth:runlocal": ("lora", ("unet",), SD1_FIXTURE, 4, 2, "dreambooth", 32, "float32", "dp"),
    "textual_inversion": ("textual_inversion", ("text_encoder",), SD15, 3000, 4, "folder", 512, "float32", "dp"),
    "textual_inversion:runlocal": ("textual_inversion", ("text_encoder",), SD1_FIXTURE, 10, 2, "synthetic", 32,
                                   "float32", "dp"),
    "controlnet": ("controlnet", ("controlnet",), EMBEDDED, 5500, 16, "shapes", 64, "float32", "dp"),
    "controlnet:runlocal": ("controlnet", ("controlnet",), EMBEDDED, 3, 4, "shapes", 64, "float32", "dp"),
}  # fmt: skip


def test_every_documented_config_has_expectations():
    assert sorted(SPECS) == sorted(RUNS)


def test_no_config_starts_from_the_smoke_config():
    for path in CONFIG_DIR.glob("*.py"):
        src = path.read_text()
        assert not re.search(r"import .*\btiny\b|configs\.tiny|tiny\.get_config", src), f"{path.name} uses tiny.py"


@pytest.mark.parametrize("spec", SPECS)
def test_run_settings(spec):
    cfg = load(spec)
    got = (cfg.get("trainer", "diffusion"), tuple(cfg.train), cfg.init_from, cfg.steps, cfg.batch_size,
           cfg.data.source, cfg.data.image_size, cfg.compute_dtype, cfg.sharding)  # fmt: skip
    assert got == RUNS[spec]
    assert cfg.optim.steps == cfg.steps  # the LR schedule's length follows steps ...
    assert load(spec, [("steps", "7")]).optim.steps == 7  # ... also when --config.steps sets it


@pytest.mark.parametrize("spec", SPECS)
def test_unknown_variant_is_refused(spec):
    with pytest.raises(ValueError, match="unknown variant 'bogus'"):
        importlib.import_module(f"configs.{spec.partition(':')[0]}").get_config("bogus")


def test_sharded_configs_shard_over_fsdp():
    for spec in ("sd21_finetune", "sdxl_finetune"):
        assert load(spec).mesh.to_dict() == {"data": 1, "fsdp": -1, "tensor": 1}
    assert load("sd15_finetune").mesh.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1}


# -- the trainer's config check ---------------------------------------------------------------------------------------


def image_folder(path: pathlib.Path) -> str:
    path.mkdir(parents=True)
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (40, 36), color).save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(f"a {color} picture")
    return str(path)


@pytest.mark.parametrize("spec", SPECS)
def test_check_config(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # runlocal names tests/fixtures/... relative to the repo, as its command runs
    traced = []  # the from-scratch init traces run in test_scratch_architecture, once per architecture
    monkeypatch.setattr(checks, "check_model_builds", traced.append)
    cfg = load(spec)
    if cfg.data.source in ("folder", "dreambooth"):  # what the docstring's command passes: the user's images
        with pytest.raises(ConfigError, match="data.path is empty"):
            check_config(cfg)
        extra = [("data.path", image_folder(tmp_path / "images"))]
        if cfg.data.get("with_prior_preservation"):
            extra.append(("data.class_path", str(tmp_path / "class_images")))
        cfg = load(spec, extra)
    check_config(cfg, tmp_path / "workdir")
    assert len(traced) == (RUNS[spec][2] is None)  # from scratch it traces the models' init


# -- from-scratch architectures ---------------------------------------------------------------------------------------

# (U-Net, VAE, text encoder) parameters; the same counts as diffusers' UNet2DConditionModel / AutoencoderKL and
# transformers' CLIPTextModel built on the meta device from each arch's to_diffusers_config().
SCRATCH = {
    "tiny": (792_964, 62_463, 1_609_216),
    "unet_text_scratch": (792_964, 62_463, 1_609_216),
    "vae_scratch": (792_964, 954_567, 1_609_216),
    "shapes_vae": (792_964, 681_911, 1_609_216),
    "shapes_vae:runlocal": (792_964, 681_911, 1_609_216),
    "shapes_vae_decoder": (792_964, 681_911, 1_609_216),
    "shapes_vae_decoder:runlocal": (792_964, 681_911, 1_609_216),
    "shapes_unet": (4_222_948, 681_911, 6_921_344),
    "shapes_unet:runlocal": (4_222_948, 681_911, 6_921_344),
}
# Parameters with gradients: the trained components less optim.freeze (the decoder fine-tune freezes the encoder).
TRAINED = {"tiny": 792_964, "unet_text_scratch": 2_402_180, "vae_scratch": 954_567, "shapes_vae": 681_911,
           "shapes_vae_decoder": 423_127, "shapes_unet": 11_144_292}  # fmt: skip
COMPONENT = {"unet": 0, "vae": 1, "text_encoder": 2}


@functools.cache
def init_shapes(module, arch):
    """The parameter shapes ``module.init_params(arch)`` makes, as check_model_builds traces them (cached)."""
    return jax.eval_shape(lambda k: module.init_params(arch, k), jax.random.key(0))


def test_every_scratch_config_has_counts():
    assert sorted(SCRATCH) == sorted(s for s in SPECS if RUNS[s][2] is None)


@pytest.mark.parametrize("spec", sorted(SCRATCH))
def test_scratch_architecture(spec):
    cfg = load(spec)
    archs = scratch_model_configs(cfg)
    u, v, t = archs
    params = [init_shapes(m, a) for a, m in zip(archs, (unet, vae, clip))]
    assert tuple(count(p) for p in params) == SCRATCH[spec]
    trained = {c: params[COMPONENT[c]] for c in cfg.train}
    freeze = tuple(cfg.optim.freeze)
    labels = freeze_labels(trained, freeze) if freeze else jax.tree.map(lambda _: "train", trained)
    n = sum(count(x) for x, lab in zip(jax.tree.leaves(trained), jax.tree.leaves(labels)) if lab == "train")
    assert n == TRAINED[spec.partition(":")[0]]
    assert u.in_channels == u.out_channels == v.latent_channels == 4
    assert u.cross_attention_dim == t.hidden_size  # the U-Net attends to the text encoder's hidden states
    assert t.vocab_size == 49408  # the real CLIP tokenizer's ids
    if "unet" in cfg.train:  # the U-Net trains on latents of data.image_size images
        assert u.sample_size * v.downsample_factor == cfg.data.image_size


def test_embedded_model_configs_rebuild_the_shipped_model():
    """shapes_unet (with the stage-1 VAE) is the architecture of sd_jax/default_model, its export."""
    u, v, t = scratch_model_configs(load("shapes_unet"))
    shipped = ROOT / "sd_jax" / "default_model"
    assert u == unet.UNetConfig.from_diffusers_config(read_json(shipped / "unet" / "config.json"))
    assert t == clip.CLIPTextConfig.from_diffusers_config(read_json(shipped / "text_encoder" / "config.json"))
    shipped_vae = vae.VAEConfig.from_diffusers_config(read_json(shipped / "vae" / "config.json"))
    assert v == dataclasses.replace(shipped_vae, scaling_factor=v.scaling_factor)  # measured at export
    for stage in ("shapes_vae", "shapes_vae_decoder"):
        assert scratch_model_configs(load(stage))[1] == v  # init_components.vae fits
    assert t.max_position_embeddings == 16 and u.block_out_channels == (32, 64, 128)


# -- fine-tunes: the architecture init_from names ----------------------------------------------------------------------

# Hub id -> (shipped config folder, U-Net, VAE, text encoders): the real checkpoints' architectures.
VARIANTS = {
    SD15: ("sd15", unet.UNetConfig.sd15, vae.VAEConfig.sd, (clip.CLIPTextConfig.sd15,)),
    SD21: ("sd21", unet.UNetConfig.sd21, vae.VAEConfig.sd, (clip.CLIPTextConfig.sd21,)),
    SDXL: (
        "sdxl_base",
        unet.UNetConfig.sdxl,
        vae.VAEConfig.sdxl,
        (clip.CLIPTextConfig.sdxl_l, clip.CLIPTextConfig.sdxl_g),
    ),  # fmt: skip
}
# init_from -> (U-Net parameters, cross-attention width, LoRA parameters at rank 4 on to_q/to_k/to_v/to_out.0);
# U-Net counts as test_full_size_maps.py; LoRA counts as peft's LoraConfig(r=4) added to the diffusers U-Net.
FINETUNE = {
    SD15: (859_520_964, 768, 797_184),
    SD21: (865_910_724, 1024, None),
    SDXL: (2_567_463_684, 2048, None),
    SDXL_FIXTURE: (363_188, 64, None),
    SD1_FIXTURE: (203_204, 32, 5_504),
    EMBEDDED: (4_222_948, 128, None),
}


def architecture(init_from: str):
    """(UNetConfig, VAEConfig, text configs) of the checkpoint ``init_from`` names, without its weights."""
    if init_from in VARIANTS:
        folder, u, v, texts = VARIANTS[init_from]
        arch = (u(), v(), tuple(t() for t in texts))
        real = SHIPPED / folder
    else:
        arch, real = None, ROOT / init_from
    names = ("text_encoder", "text_encoder_2") if (real / "text_encoder_2").is_dir() else ("text_encoder",)
    texts = tuple(clip.CLIPTextConfig.from_diffusers_config(read_json(real / n / "config.json")) for n in names)
    shipped = (unet.UNetConfig.from_diffusers_config(read_json(real / "unet" / "config.json")),
               vae.VAEConfig.from_diffusers_config(read_json(real / "vae" / "config.json")), texts)  # fmt: skip
    if arch is not None:  # VAEConfig has one SD variant; its sample_size (512 or 768) is metadata only
        arch = (arch[0], dataclasses.replace(arch[1], sample_size=shipped[1].sample_size), arch[2])
        assert arch == shipped, f"{init_from}: the named variant is not the real checkpoint's config"
    return shipped


FINETUNES = [s for s in SPECS if RUNS[s][2] is not None]


def unet_and_lora_counts(cfg, u) -> tuple:
    params = unet.abstract_params(u)
    if cfg.get("trainer") != "lora":
        return count(params), None
    targets, rank, alpha = {"unet": tuple(cfg.lora.unet_targets)}, cfg.lora.rank, cfg.lora.alpha
    adapters = jax.eval_shape(lambda k: lora.init_lora({"unet": params}, targets, rank, alpha, k).params,
                              jax.random.key(0))  # fmt: skip
    return count(params), count(adapters)


@pytest.mark.parametrize("spec", FINETUNES)
def test_finetune_architecture(spec):
    cfg = load(spec)
    u, v, texts = architecture(cfg.init_from)
    n_unet, width, n_lora = FINETUNE[cfg.init_from]
    assert u.in_channels == v.latent_channels == 4
    assert u.cross_attention_dim == sum(t.hidden_size for t in texts) == width  # SDXL: both encoders concatenated
    assert u.sample_size * v.downsample_factor == cfg.data.image_size  # trains at the checkpoint's resolution
    if cfg.get("trainer") == "lora":
        assert (cfg.lora.rank, cfg.lora.alpha) == (4, 4.0)
    if cfg.init_from not in VARIANTS:  # a test fixture: milliseconds to trace
        assert unet_and_lora_counts(cfg, u) == (n_unet, n_lora if cfg.get("trainer") == "lora" else None)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["sd15_finetune", "sd21_finetune", "sdxl_finetune", "lora"])
def test_finetune_full_size_counts(spec):
    """The full-size U-Nets (seconds each to trace; the default run checks the same architectures' counts in
    test_full_size_maps.py, and here that each config's init_from is that architecture)."""
    cfg = load(spec)
    n_unet, _, n_lora = FINETUNE[cfg.init_from]
    want = (n_unet, n_lora if cfg.get("trainer") == "lora" else None)
    assert unet_and_lora_counts(cfg, architecture(cfg.init_from)[0]) == want


# -- parse_arg ---------------------------------------------------------------------------------------------------------


def test_parse_arg_types_and_flags():
    a = common.parse_arg("variant=sd21,runlocal,res=512,lr=1e-4,seed=7,name=abc", variant="sd15", runlocal=False,
                         res=256, lr=1e-3, seed=None, name=None, fsdp=False)  # fmt: skip
    want = {"variant": "sd21", "runlocal": True, "res": 512, "lr": 1e-4, "seed": 7, "name": "abc", "fsdp": False}
    assert a.to_dict() == want
    assert type(a.res) is int and type(a.lr) is float
    assert common.parse_arg(None, runlocal=False).runlocal is False
    assert common.parse_arg("", runlocal=False).runlocal is False
    assert common.parse_arg("runlocal=false", runlocal=True).runlocal is False
    assert common.parse_arg(" runlocal , ", runlocal=False).runlocal is True
    assert common.parse_arg(None).to_dict() == {}


def test_parse_arg_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown variant 'runloacl' \(known: runlocal, res\)"):
        common.parse_arg("runloacl", runlocal=False, res=256)
    with pytest.raises(ValueError, match="unknown variant 'runlocal'.*takes no argument"):
        common.parse_arg("runlocal")
    with pytest.raises(ValueError, match="res='big': expected int"):
        common.parse_arg("res=big", res=256)
    with pytest.raises(ValueError, match="runlocal='maybe': expected true or false"):
        common.parse_arg("runlocal=maybe", runlocal=False)
    with pytest.raises(ValueError, match="res needs a value"):
        common.parse_arg("res", res=256)


def test_common_defaults_are_a_valid_run(tmp_path):
    cfg = common.get_config()
    check_config(cfg, tmp_path)
    assert cfg.to_dict() == load("tiny").to_dict()  # tiny.py is the defaults' smoke run
