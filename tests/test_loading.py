"""Loading diffusers folders: variants, shards, export round trip, and every kind of bad input."""

import json
import shutil

import jax
import numpy as np
import pytest

from sd_jax import errors
from sd_jax.loading.diffusers import load_component, resolve
from sd_jax.loading.export import save_component
from sd_jax.loading.safetensors_io import read_safetensors, write_safetensors

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def unet_dir(tmp_path, fixtures_dir):
    d = tmp_path / "unet"
    shutil.copytree(fixtures_dir / "sd1" / "unet", d)
    (d / "diffusion_pytorch_model.fp16.safetensors").unlink()
    return d


def leaves_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    return max(
        float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for (_, x), (_, y) in zip(fa, fb)
    )


def test_fp16_variant_loads_as_fp32(fixtures_dir):
    _, p32 = load_component(fixtures_dir / "sd1", "unet")
    _, p16 = load_component(fixtures_dir / "sd1", "unet", variant="fp16")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(p16))
    assert 0 < leaves_equal(p32, p16) < 2e-3  # fp16 rounding, nothing else


def test_sharded_checkpoint_loads(fixtures_dir):
    index = json.loads((fixtures_dir / "sd2" / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg, params = load_component(fixtures_dir / "sd2", "unet")
    assert cfg.use_linear_projection and cfg.upcast_attention


def test_export_round_trip_is_exact(unet_dir, tmp_path):
    cfg, params = load_component(unet_dir)
    out = save_component(tmp_path / "export", cfg, params)
    cfg2, params2 = load_component(out)
    assert cfg2 == cfg and leaves_equal(params, params2) == 0.0
    a, b = read_safetensors(unet_dir / WEIGHTS), read_safetensors(out / WEIGHTS)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.live
def test_export_loads_in_diffusers(unet_dir, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    cfg, params = load_component(unet_dir)
    out = save_component(tmp_path / "export", cfg, params)
    theirs = UNet2DConditionModel.from_pretrained(out)
    orig = UNet2DConditionModel.from_pretrained(unet_dir)
    for (k, v), (k2, v2) in zip(theirs.state_dict().items(), orig.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def rewrite(unet_dir, change):
    state = dict(read_safetensors(unet_dir / WEIGHTS))
    change(state)
    write_safetensors(unet_dir / WEIGHTS, state)


def test_unexpected_key_is_named(unet_dir):
    rewrite(unet_dir, lambda s: s.update({"down_blocks.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(errors.UnexpectedKeyError, match=r"down_blocks\.0\.extra\.weight") as e:
        load_component(unet_dir)
    assert WEIGHTS in str(e.value)


def test_missing_parameter_is_named(unet_dir):
    rewrite(unet_dir, lambda s: s.pop("conv_out.bias"))
    with pytest.raises(errors.MissingParameterError, match=r"conv_out/bias \(torch key conv_out\.bias\)"):
        load_component(unet_dir)


def test_shape_mismatch_names_both_shapes(unet_dir):
    rewrite(unet_dir, lambda s: s.update({"conv_in.weight": np.zeros((16, 5, 3, 3), np.float32)}))
    with pytest.raises(
        errors.ShapeMismatchError,
        match=r"conv_in\.weight: checkpoint \(16, 5, 3, 3\).*ours conv_in/kernel \(3, 3, 4, 16\)",
    ):
        load_component(unet_dir)


def test_missing_component_folder(tmp_path, fixtures_dir):
    from sd_jax.loading.diffusers import load_checkpoint

    shutil.copytree(fixtures_dir / "sd1", tmp_path / "sd1")
    shutil.rmtree(tmp_path / "sd1" / "vae")
    with pytest.raises(errors.MissingComponentError, match="'vae'.*missing"):
        load_checkpoint(tmp_path / "sd1")


def test_missing_weights_file_lists_folder(unet_dir):
    (unet_dir / WEIGHTS).unlink()
    with pytest.raises(errors.MissingComponentError, match="no weights found.*config.json"):
        load_component(unet_dir)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_corrupt_safetensors_names_the_file(unet_dir, cut):
    data = (unet_dir / WEIGHTS).read_bytes()
    (unet_dir / WEIGHTS).write_bytes(data[:cut])
    with pytest.raises(errors.CorruptCheckpointError, match=WEIGHTS):
        load_component(unet_dir)


def test_unsupported_architecture_names_the_key(unet_dir):
    cfg = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps({**cfg, "resnet_time_scale_shift": "scale_shift"}))
    with pytest.raises(errors.UnsupportedArchitectureError, match="resnet_time_scale_shift='scale_shift'"):
        load_component(unet_dir)
    (unet_dir / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(errors.UnsupportedArchitectureError, match="'UNet2DModel' is not supported"):
        load_component(unet_dir)


def test_pickle_is_refused_with_the_opt_in_named(unet_dir):
    (unet_dir / WEIGHTS).rename(unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(errors.UnsafeCheckpointError, match="allow_pickle=True"):
        load_component(unet_dir)


@pytest.mark.live
def test_pickle_loads_with_opt_in(unet_dir):
    import torch

    cfg, ref = load_component(unet_dir)
    state = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(unet_dir / WEIGHTS).items()}
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / WEIGHTS).unlink()
    _, params = load_component(unet_dir, allow_pickle=True)
    assert leaves_equal(ref, params) == 0.0


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(errors.MissingComponentError, match="could not be fetched from the Hub"):
        resolve("someone/not-a-local-folder")


def test_export_cli_single_file_to_diffusers_and_back(fixtures_dir, tmp_path):
    from sd_jax.export import main
    from sd_jax.loading.diffusers import load_checkpoint

    out = tmp_path / "exported"
    main(["--model", str(fixtures_dir / "single_file" / "sd1.safetensors"), "--config-dir", str(fixtures_dir / "sd1"),
          "--out", str(out)])  # fmt: skip
    a, b = load_checkpoint(fixtures_dir / "sd1"), load_checkpoint(out)
    assert sorted(b.models) == sorted(n for n in a.models if n != "safety_checker")  # not in single files
    for name in b.models:
        assert leaves_equal(a.params(name), b.params(name)) == 0.0
    assert (out / "tokenizer" / "vocab.json").read_text() == (
        fixtures_dir / "sd1" / "tokenizer" / "vocab.json"
    ).read_text()
    main(["--model", str(out), "--out", str(tmp_path / "again.safetensors"), "--single-file", "sd1"])
    assert (
        read_safetensors(tmp_path / "again.safetensors").keys()
        == read_safetensors(fixtures_dir / "single_file" / "sd1.safetensors").keys()
    )


@pytest.mark.live
def test_exported_pipeline_loads_in_diffusers(fixtures_dir, tmp_path):
    import diffusers
    import torch

    from sd_jax.loading.diffusers import load_checkpoint
    from sd_jax.loading.export import save_checkpoint

    out = save_checkpoint(tmp_path / "sdxl", load_checkpoint(fixtures_dir / "sdxl"))
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(fixtures_dir / "sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ref, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_parameter_count_from_headers_matches_the_loaded_models(fixtures_dir):
    from sd_jax.loading.diffusers import load_checkpoint, parameter_count

    ckpt = load_checkpoint(fixtures_dir / "sd1")
    loaded = sum(a.size for _, params in ckpt.models.values() for a in jax.tree.leaves(params))
    assert parameter_count(fixtures_dir / "sd1") == loaded  # the sd1 fixture also ships fp16 variants: not counted


def test_model_index_file_is_refused_naming_the_folder(fixtures_dir):
    with pytest.raises(errors.MissingComponentError, match="pass the folder .*fixtures/sd1 instead"):
        resolve(fixtures_dir / "sd1" / "model_index.json")


def test_loading_drops_the_host_copies_and_mapped_pages_stay_readable(fixtures_dir):
    """``from_checkpoint(release=True)`` (what ``StableDiffusion.load`` does) leaves no host weights in the
    checkpoint once they are on the device, and dropping a mapped file's resident pages keeps its arrays valid."""
    from sd_jax import components as C
    from sd_jax.loading import safetensors_io
    from sd_jax.loading.diffusers import load_checkpoint

    f = next((fixtures_dir / "sd1" / "unet").glob("*.safetensors"))
    mapped = safetensors_io.read_safetensors(f)
    before = {k: np.array(v) for k, v in mapped.items()}
    assert any(r() is not None for r in safetensors_io._MAPS)
    safetensors_io.drop_mapped_pages()
    for k, v in mapped.items():  # faulted back in from the file
        np.testing.assert_array_equal(v, before[k])
    ckpt = load_checkpoint(fixtures_dir / "sd1")
    kept = C.from_checkpoint(ckpt)[1]
    assert ckpt.models["unet"][1] is not None  # the default leaves the caller's checkpoint as it was
    released = C.from_checkpoint(ckpt, release=True)[1]
    assert all(ckpt.models[n][1] is None for n in ("unet", "vae", "text_encoder"))
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(released)):
        np.testing.assert_array_equal(a, b)
