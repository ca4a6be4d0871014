"""Single-file original checkpoints: same params as the diffusers folder, strict errors, full-size key maps."""

import json
import shutil

import jax
import numpy as np
import pytest

from sd_jax import errors
from sd_jax.convert import single_file as sf
from sd_jax.loading.diffusers import load_checkpoint
from sd_jax.loading.safetensors_io import read_safetensors, write_safetensors
from sd_jax.loading.single_file import load_single_file


@pytest.mark.parametrize("variant,arch", [("sd1", "sd1"), ("sd2", "sd2"), ("sdxl", "sdxl")])
def test_single_file_equals_diffusers_folder(variant, arch, fixtures_dir):
    path = fixtures_dir / "single_file" / f"{variant}.safetensors"
    assert sf.detect_architecture(read_safetensors(path)) == arch
    single = load_single_file(path, config_dir=fixtures_dir / variant)
    folder = load_checkpoint(fixtures_dir / variant)
    # A single file carries no safety checker; every other model must be there.
    assert sorted(single.models) == sorted(n for n in folder.models if n != "safety_checker")
    for name in single.models:
        a, b = jax.tree.leaves(folder.params(name)), jax.tree.leaves(single.params(name))
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), name


def test_single_file_outputs_match_reference(fixtures_dir):
    """The numbers, not only the tensors: the single-file U-Net reproduces diffusers' stored output."""
    from sd_jax.models.unet import UNet2DConditionModel

    ck = load_single_file(fixtures_dir / "single_file" / "sdxl.safetensors", config_dir=fixtures_dir / "sdxl")
    ref = np.load(fixtures_dir / "reference" / "sdxl.npz")
    out = UNet2DConditionModel(ck.config("unet")).apply(
        {"params": ck.params("unet")},
        ref["unet/sample"].transpose(0, 2, 3, 1),
        ref["unet/timestep"],
        ref["unet/encoder_hidden_states"],
        text_embeds=ref["unet/text_embeds"],
        time_ids=ref["unet/time_ids"],
    )
    assert np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref["unet/out"]).max() <= 1e-4


@pytest.fixture
def sd1_file(tmp_path, fixtures_dir):
    p = tmp_path / "model.safetensors"
    shutil.copy(fixtures_dir / "single_file" / "sd1.safetensors", p)
    return p


def edit(path, change):
    state = dict(read_safetensors(path))
    change(state)
    write_safetensors(path, state)


def test_training_leftovers_are_reported_not_loaded(sd1_file, fixtures_dir):
    edit(sd1_file, lambda s: s.update({"model_ema.decay": np.ones((), np.float32), "betas": np.ones(1000, np.float32)}))
    ck = load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")
    assert sorted(ck.ignored_keys) == ["betas", "model_ema.decay"]


def test_unknown_key_is_named(sd1_file, fixtures_dir):
    edit(sd1_file, lambda s: s.update({"model.diffusion_model.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(errors.UnexpectedKeyError, match=r"model\.diffusion_model\.extra\.weight"):
        load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")


def test_missing_key_is_named(sd1_file, fixtures_dir):
    edit(sd1_file, lambda s: s.pop("first_stage_model.decoder.mid.attn_1.q.weight"))
    with pytest.raises(errors.MissingParameterError, match=r"first_stage_model\.decoder\.mid\.attn_1\.q\.weight"):
        load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")


def test_not_stable_diffusion(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"encoder.layer.0.weight": np.zeros(2, np.float32)})
    with pytest.raises(errors.UnsupportedArchitectureError, match="model.diffusion_model"):
        load_single_file(tmp_path / "x.safetensors")


def test_pickle_single_file_is_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not even opened")
    with pytest.raises(errors.UnsafeCheckpointError, match="allow_pickle=True"):
        load_single_file(tmp_path / "model.ckpt")


def test_shipped_configs_are_used_without_config_dir(sd1_file):
    # The tiny 2-level weights do not fit the real 4-level SD 1.5 config: the strict load says so.
    with pytest.raises(errors.UnexpectedKeyError, match=r"input_blocks\.3\.0"):
        load_single_file(sd1_file)


# -- full size, no weights: our original-layout keys, pushed through diffusers' own converters --


def _meta_state(name):
    """Original-layout {key: torch meta tensor} for a shipped config, built from our key map."""
    import torch

    from sd_jax.loading.diffusers import read_json
    from sd_jax.loading.registry import class_name_of, component_for
    from sd_jax.loading.single_file import key_maps_for, shipped_config_dir

    arch = {"sd15": "sd1", "sdxl_base": "sdxl"}[name]
    folder = shipped_config_dir(arch)
    configs, dicts = {}, {}
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / sub).is_dir():
            continue
        cfg = read_json(folder / sub / "config.json")
        dicts[sub] = cfg
        mod, config_cls, _ = component_for(class_name_of(cfg, sub), sub).load()
        configs[sub] = (mod, config_cls.from_diffusers_config(cfg))
    maps = key_maps_for(arch, configs)
    state = {}
    for sub, (mod, config) in configs.items():
        from sd_jax.convert.diffusers import flax_path_to_torch_key

        params = mod.abstract_params(config)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            p = tuple(k.key for k in path)
            key = flax_path_to_torch_key(p)
            shape = leaf.shape
            if p[-1] == "kernel":
                shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
            ok, sl = maps[sub][key]
            if ok.endswith("text_projection"):
                shape = shape[::-1]
            if "mid.attn_1." in ok and ok.endswith("weight") and len(shape) == 2:
                shape = (*shape, 1, 1)
            if sl is not None:
                shape = (3 * shape[0], *shape[1:])
            state[ok] = torch.empty(shape, device="meta")
    return state, dicts, maps


@pytest.mark.live
@pytest.mark.parametrize("name", ["sd15", "sdxl_base"])
def test_full_size_single_file_layout_matches_diffusers_converters(name):
    import diffusers
    import torch
    import transformers
    from diffusers.loaders import single_file_utils as su

    state, dicts, maps = _meta_state(name)
    print(f"{name}: {len(state)} original-layout tensors")
    converted = {
        "unet": su.convert_ldm_unet_checkpoint(state, dicts["unet"]),
        "vae": su.convert_ldm_vae_checkpoint(state, dicts["vae"]),
    }
    if name == "sd15":
        converted["text_encoder"] = su.convert_ldm_clip_checkpoint(state)
    else:
        converted["text_encoder"] = su.convert_ldm_clip_checkpoint(
            state, remove_prefix="conditioner.embedders.0.transformer."
        )
        with torch.device("meta"):
            te2 = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(
                    **{k: v for k, v in dicts["text_encoder_2"].items() if k != "architectures"}
                )
            )
        converted["text_encoder_2"] = su.convert_open_clip_checkpoint(
            te2, state, prefix="conditioner.embedders.1.model."
        )
    for sub, got in converted.items():
        with torch.device("meta"):
            if sub.startswith("text"):
                cls = getattr(transformers, dicts[sub]["architectures"][0])
                cfg = transformers.CLIPTextConfig(**{k: v for k, v in dicts[sub].items() if k != "architectures"})
                model = cls(cfg)
            else:
                model = getattr(diffusers, dicts[sub]["_class_name"]).from_config(dicts[sub])
        want = {k.removeprefix("text_model."): tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k.removeprefix("text_model."): tuple(v.shape) for k, v in got.items()}
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        have = {k: v for k, v in have.items() if not k.endswith("position_ids")}
        assert have == want, (sub, sorted(set(have) ^ set(want))[:10])


def test_sd2_extra_openclip_layer_is_ignored(tmp_path, fixtures_dir):
    p = tmp_path / "sd2.safetensors"
    shutil.copy(fixtures_dir / "single_file" / "sd2.safetensors", p)
    edit(
        p, lambda s: s.update({"cond_stage_model.model.transformer.resblocks.23.ln_1.weight": np.ones(32, np.float32)})
    )
    ck = load_single_file(p, config_dir=fixtures_dir / "sd2")
    assert ck.ignored_keys == ["cond_stage_model.model.transformer.resblocks.23.ln_1.weight"]
    json.dumps(ck.ignored_keys)
