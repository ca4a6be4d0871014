"""Single-file original checkpoints: same params as the diffusers folder, strict errors, diffusers' converters agree."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from sd_jax import errors
from sd_jax.convert import single_file as sf
from sd_jax.loading.diffusers import load_checkpoint, read_json
from sd_jax.loading.safetensors_io import read_safetensors, write_safetensors
from sd_jax.loading.single_file import layout_for, load_single_file, save_single_file, shipped_config_dir

# fixture folder -> architecture; sd1/sd2/sdxl ship as files verified by diffusers (tools/make_single_file_fixtures.py)
VARIANTS = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "inpaint": "sd1_inpaint", "upscale": "x4_upscaler"}
SHIPPED = {"sd15": "sd1", "sd15_inpaint": "sd1_inpaint", "sd21": "sd2", "sdxl_base": "sdxl",
           "sdxl_refiner": "sdxl_refiner", "sd_x4_upscaler": "x4_upscaler"}  # fmt: skip


def assert_same_params(a, b, name):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    assert len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb)), name


def layout_of(folder, arch):
    from sd_jax.models.unet import UNetConfig

    dicts = {n: read_json(folder / n / "config.json") for n in sf.COMPONENTS if (folder / n).is_dir()}
    return layout_for(arch, dicts, UNetConfig.from_diffusers_config(dicts["unet"]))


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    FIXTURES = pathlib.Path(__file__).parent / "fixtures"
    """{variant: path}: the stored files, plus inpaint/upscale written by ``save_single_file`` on the fly."""
    out = {v: FIXTURES / "single_file" / f"{v}.safetensors" for v in ("sd1", "sd2", "sdxl")}
    tmp = tmp_path_factory.mktemp("single")
    for v in ("inpaint", "upscale"):
        out[v] = save_single_file(tmp / f"{v}.safetensors", load_checkpoint(FIXTURES / v), VARIANTS[v])
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_file_equals_diffusers_folder(variant, single_files, fixtures_dir):
    path = single_files[variant]
    assert sf.detect_architecture(read_safetensors(path)) == VARIANTS[variant]
    single = load_single_file(path, config_dir=fixtures_dir / variant)
    folder = load_checkpoint(fixtures_dir / variant)
    # A single file carries no safety checker; every other model must be there.
    assert sorted(single.models) == sorted(n for n in folder.models if n != "safety_checker")
    for name in single.models:
        assert_same_params(folder.params(name), single.params(name), name)
    assert single.ignored_keys == [] and single.source == path


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_round_trip_is_identity(variant, fixtures_dir):
    """original -> diffusers -> original reproduces every tensor, per component, with no model code."""
    state = read_safetensors(fixtures_dir / "single_file" / f"{variant}.safetensors")
    layout = layout_of(fixtures_dir / variant, VARIANTS[variant])
    parts, report = sf.split_original(state)
    assert report == {"ignored": [], "unknown": []}
    back = {}
    for name, part in parts.items():
        diffusers = sf.original_to_diffusers(name, part, layout)
        back.update(sf.diffusers_to_original(name, diffusers, layout))
    assert back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape and np.array_equal(back[k], state[k]) for k in state)


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


@pytest.mark.parametrize(
    "name",
    [
        "sd15",
        "sdxl_base",
        "sdxl_refiner",
        "sd_x4_upscaler",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("sd15_inpaint", "sd21")),
    ],
)
def test_full_size_key_map_covers_our_models(name):
    """At full size the map's diffusers keys are exactly our models' parameters (shapes only, no allocation)."""
    from sd_jax.convert.diffusers import flax_path_to_torch_key
    from sd_jax.loading.registry import class_name_of, component_for

    folder = shipped_config_dir(SHIPPED[name])
    layout = layout_of(folder, SHIPPED[name])
    counts = {}
    for comp in sf.COMPONENTS:
        if not (folder / comp).is_dir():
            continue
        cfg = read_json(folder / comp / "config.json")
        mod, config_cls, _ = component_for(class_name_of(cfg, comp), comp).load()
        params = mod.abstract_params(config_cls.from_diffusers_config(cfg))
        ours = {
            flax_path_to_torch_key(tuple(k.key for k in p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        km = sf.key_map(comp, layout)
        assert set(km) == ours, (comp, sorted(set(km) ^ ours)[:10])
        counts[comp] = len({ok for ok, _ in km.values()})
    print(f"{name}: original-layout tensors per model {counts}")


# -- detection --


def shapes_only(shapes):
    return {k: np.broadcast_to(np.zeros((), np.float16), s) for k, s in shapes.items()}


@pytest.mark.parametrize(
    "in_ch,ctx,text,want",
    [
        (4, 768, "cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
        (9, 768, "cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1_inpaint"),
        (4, 1024, "cond_stage_model.model.token_embedding.weight", "sd2"),
        (9, 1024, "cond_stage_model.model.token_embedding.weight", "sd2_inpaint"),
        (7, 1024, "cond_stage_model.model.token_embedding.weight", "x4_upscaler"),
        (4, 2048, "conditioner.embedders.1.model.token_embedding.weight", "sdxl"),
        (4, 768, None, "sd1"),  # U-Net only: the cross-attention width decides
        (9, 1024, None, "sd2_inpaint"),
        (4, 2048, None, "sdxl"),
        (4, 1280, "conditioner.embedders.0.model.text_projection", "sdxl_refiner"),
    ],
)
def test_detect_architecture(in_ch, ctx, text, want):
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, in_ch, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, ctx),
    }
    if text:
        shapes[text] = (8,)
    assert sf.detect_architecture(shapes_only(shapes)) == want


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}, "8 input channels"),  # instruct-pix2pix
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 4096)}, "4096"),
    ],
)
def test_unsupported_architectures_are_named(extra, match):
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)} | extra
    if "to_k" not in str(extra):
        shapes["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = (8,)
    with pytest.raises(errors.UnsupportedArchitectureError, match=match):
        sf.detect_architecture(shapes_only(shapes))


def test_not_stable_diffusion(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"encoder.layer.0.weight": np.zeros(2, np.float32)})
    with pytest.raises(errors.UnsupportedArchitectureError, match="model.diffusion_model"):
        load_single_file(tmp_path / "x.safetensors")


# -- strictness --


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
    leftovers = {"model_ema.decay": (), "betas": (1000,), "alphas_cumprod": (1000,),
                 "model.diffusion_model.logvar": (10,),
                 "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77)}  # fmt: skip
    edit(sd1_file, lambda s: s.update({k: np.ones(v, np.float32) for k, v in leftovers.items()}))
    ck = load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")
    assert ck.ignored_keys == sorted(leftovers)


def test_upscaler_noise_schedule_is_ignored(single_files, tmp_path, fixtures_dir):
    p = tmp_path / "up.safetensors"
    shutil.copy(single_files["upscale"], p)
    extra = ["low_scale_model.betas", "low_scale_model.alphas_cumprod", "low_scale_model.sqrt_alphas_cumprod"]
    edit(p, lambda s: s.update({k: np.ones(350, np.float32) for k in extra}))
    assert load_single_file(p, config_dir=fixtures_dir / "upscale").ignored_keys == sorted(extra)


def test_sd2_extra_openclip_layer_and_projection_are_ignored(tmp_path, fixtures_dir):
    p = tmp_path / "sd2.safetensors"
    shutil.copy(fixtures_dir / "single_file" / "sd2.safetensors", p)
    extra = ["cond_stage_model.model.transformer.resblocks.3.ln_1.weight", "cond_stage_model.model.text_projection"]
    edit(p, lambda s: s.update({k: np.ones((32,), np.float32) for k in extra}))
    assert load_single_file(p, config_dir=fixtures_dir / "sd2").ignored_keys == sorted(extra)


def test_unknown_key_is_named(sd1_file, fixtures_dir):
    edit(sd1_file, lambda s: s.update({"model.diffusion_model.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(errors.UnexpectedKeyError, match=r"model\.diffusion_model\.extra\.weight"):
        load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")


def test_unknown_prefix_is_named(sd1_file, fixtures_dir):
    edit(sd1_file, lambda s: s.update({"control_model.time_embed.0.weight": np.ones(3, np.float32)}))
    with pytest.raises(errors.UnexpectedKeyError, match=r"control_model\.time_embed\.0\.weight"):
        load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")


def test_missing_key_is_named(sd1_file, fixtures_dir):
    edit(sd1_file, lambda s: s.pop("first_stage_model.decoder.mid.attn_1.q.weight"))
    with pytest.raises(errors.MissingParameterError, match=r"first_stage_model\.decoder\.mid\.attn_1\.q\.weight"):
        load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")


def test_diffusers_to_original_is_strict(fixtures_dir):
    layout = layout_of(fixtures_dir / "sd1", "sd1")
    vae = sf.original_to_diffusers("vae", read_safetensors(fixtures_dir / "single_file" / "sd1.safetensors"), layout)
    with pytest.raises(errors.UnexpectedKeyError, match=r"decoder\.extra\.weight"):
        sf.diffusers_to_original("vae", {**vae, "decoder.extra.weight": np.ones(1)}, layout)
    vae.pop("quant_conv.bias")
    with pytest.raises(errors.MissingParameterError, match=r"quant_conv\.bias"):
        sf.diffusers_to_original("vae", vae, layout)


def test_pickle_single_file_is_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not even opened")
    with pytest.raises(errors.UnsafeCheckpointError, match="allow_pickle=True"):
        load_single_file(tmp_path / "model.ckpt")


def test_shipped_configs_are_used_without_config_dir(sd1_file):
    # The tiny 2-level weights do not fit the real 4-level SD 1.5 config: the strict load says so, and its first
    # line says what to pass (the shipped fixtures need config_dir; sample.py and export name --config-dir).
    with pytest.raises(
        errors.UnexpectedKeyError, match=r"model\.diffusion_model\.input_blocks\.3\.0\.skip_connection"
    ) as e:
        load_single_file(sd1_file)
    first = str(e.value).splitlines()[0]
    assert "shipped sd15 configs" in first and "config_dir=" in first and "--config-dir" in first


def test_model_index_and_other_files_are_named_not_unpickled(fixtures_dir, tmp_path):
    from sd_jax.pipelines.pipeline import StableDiffusion

    index = fixtures_dir / "sd1" / "model_index.json"
    for load in (load_single_file, load_checkpoint, StableDiffusion.load):
        with pytest.raises(errors.MissingComponentError, match="pass the folder .*fixtures/sd1 instead"):
            load(index)  # was: "could not be unpickled" / "loading a pickle needs torch"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(errors.CorruptCheckpointError, match=r"not a checkpoint file \(suffix '.txt'\)"):
        load_single_file(tmp_path / "notes.txt")
    with pytest.raises(errors.MissingComponentError, match="no such file"):
        load_single_file(tmp_path / "missing.safetensors")


def test_allowed_pickle_without_torch_is_a_checkpoint_error(tmp_path, monkeypatch):
    import sys

    from sd_jax.loading.pickle_io import TorchMissingError

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(TorchMissingError, match="needs torch, which is not installed") as e:
        load_single_file(tmp_path / "model.ckpt", allow_pickle=True)
    assert isinstance(e.value, errors.CheckpointError) and isinstance(e.value, ImportError)


# -- diffusers' own converters on our output --


def _diffusers_models(folder):
    """{component: (torch model, config dict)} of a fixture folder."""
    import diffusers
    import transformers

    out = {}
    for name in sf.COMPONENTS:
        if not (folder / name).is_dir():
            continue
        cfg = read_json(folder / name / "config.json")
        if "_class_name" in cfg:
            out[name] = (getattr(diffusers, cfg["_class_name"]).from_pretrained(folder / name), cfg)
        else:
            out[name] = (getattr(transformers, cfg["architectures"][0]).from_pretrained(folder / name), cfg)
    return out


def _convert_with_diffusers(name, state, arch, model, cfg):
    from diffusers.loaders import single_file_utils as su

    if name == "unet":
        return su.convert_ldm_unet_checkpoint(state, cfg)
    if name == "vae":
        return su.convert_ldm_vae_checkpoint(state, cfg)
    if name == "text_encoder_2":  # the refiner's bigG is its only embedder
        prefix = "conditioner.embedders.0.model." if arch == "sdxl_refiner" else "conditioner.embedders.1.model."
        return su.convert_open_clip_checkpoint(model, state, prefix=prefix)
    if arch in ("sd2", "sd2_inpaint", "x4_upscaler"):
        return su.convert_open_clip_checkpoint(model, state, prefix="cond_stage_model.model.")
    return su.convert_ldm_clip_checkpoint(state)


def rooted(component, key):
    """transformers 5 saves CLIP text models without the ``text_model.`` root that we (and diffusers) use."""
    if component in ("unet", "vae") or key.startswith(("text_model.", "text_projection")):
        return key
    return "text_model." + key


def _norm(keys):
    # transformers 5 drops the ``text_model.`` root in state_dict(); diffusers' converters keep it.
    return {k.removeprefix("text_model."): v for k, v in keys.items() if not k.endswith("position_ids")}


@pytest.mark.live
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_converters_invert_our_map(variant, fixtures_dir):
    import torch

    arch, folder = VARIANTS[variant], fixtures_dir / variant
    layout = layout_of(folder, arch)
    models = _diffusers_models(folder)
    original = {}
    for name, (model, _) in models.items():
        sd = {rooted(name, k): v.numpy() for k, v in model.state_dict().items()}
        original.update(sf.diffusers_to_original(name, sd, layout))
    assert sf.detect_architecture(original) == arch
    original = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()}
    for name, (model, cfg) in models.items():
        got = _norm(_convert_with_diffusers(name, original, arch, model, cfg))
        want = _norm(model.state_dict())
        assert got.keys() == want.keys(), (name, sorted(got.keys() ^ want.keys())[:10])
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)


@pytest.mark.slow
@pytest.mark.live
@pytest.mark.parametrize("name", ["sd15", "sdxl_base", "sdxl_refiner"])
def test_full_size_layout_matches_diffusers_converters(name):
    """Real SD 1.5 / SDXL / SDXL refiner sizes on the meta device: our original keys and shapes go through
    diffusers' converters."""
    import diffusers
    import torch
    import transformers

    arch = SHIPPED[name]
    folder = shipped_config_dir(arch)
    layout = layout_of(folder, arch)
    models = {}
    for comp in sf.COMPONENTS:
        if not (folder / comp).is_dir():
            continue
        cfg = read_json(folder / comp / "config.json")
        with torch.device("meta"):
            if "_class_name" in cfg:
                model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
            else:
                tcfg = transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
                model = getattr(transformers, cfg["architectures"][0])(tcfg)
        models[comp] = (model, cfg)
    original = {}
    for comp, (model, _) in models.items():
        shapes = {rooted(comp, k): tuple(v.shape) for k, v in model.state_dict().items()}
        shapes = {k: v for k, v in shapes.items() if not k.endswith("position_ids")}
        km = sf.key_map(comp, layout)
        assert set(km) == set(shapes), (comp, sorted(set(km) ^ set(shapes))[:10])
        for dk, (ok, sl) in km.items():  # q/k/v fuse into one in_proj
            s = sf._to_original(ok, np.broadcast_to(np.zeros((), np.int8), shapes[dk])).shape  # a view: no memory
            original[ok] = torch.empty((3 * s[0], *s[1:]) if sl is not None else s, device="meta")
    assert sf.detect_architecture(original) == arch
    print(f"{name}: {len(original)} original-layout tensors")
    for comp, (model, cfg) in models.items():
        got = {k: tuple(v.shape) for k, v in _norm(_convert_with_diffusers(comp, original, arch, model, cfg)).items()}
        want = {k: tuple(v.shape) for k, v in _norm(model.state_dict()).items()}
        assert got == want, (comp, sorted(set(got) ^ set(want))[:10])


def test_legacy_clip_keys_without_text_model_root(sd1_file, fixtures_dir):
    """Old SD 1.x files (transformers < 4.x) store ``cond_stage_model.transformer.encoder...``: same params."""
    old = "cond_stage_model.transformer.text_model."

    def strip_root(s):
        for k in [k for k in s if k.startswith(old)]:
            s["cond_stage_model.transformer." + k[len(old) :]] = s.pop(k)

    edit(sd1_file, strip_root)
    single = load_single_file(sd1_file, config_dir=fixtures_dir / "sd1")
    assert_same_params(
        load_checkpoint(fixtures_dir / "sd1").params("text_encoder"), single.params("text_encoder"), "te"
    )


def test_save_single_file_refuses_another_architecture(tmp_path, fixtures_dir):
    """The library refuses as the CLI does: an SD1 model in the SDXL layout is a file nothing can load."""
    from sd_jax.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="the model is sd1, but sdxl was asked for"):
        save_single_file(tmp_path / "x.safetensors", load_checkpoint(fixtures_dir / "sd1"), "sdxl")
    assert not (tmp_path / "x.safetensors").exists()
