"""The SDXL refiner: loading (diffusers folder, original single file), its micro-conditioning, the handoff step and
full-size maps of the real refiner (stabilityai/stable-diffusion-xl-refiner-1.0 configs, no weights allocated).

Pixel parity with diffusers is tests/test_sdxl_img2img_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import components as C
from sd_jax import errors
from sd_jax.convert import single_file as sf
from sd_jax.loading.diffusers import load_checkpoint, read_json
from sd_jax.loading.single_file import load_single_file
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.sampling.registry import cutoff_step

# diffusers/transformers models on torch's meta device from sd_jax/model_configs/sdxl_refiner (torch 2.13,
# the reference extra): sum(p.numel()); test_full_size_maps_one_to_one recomputes them.
REFINER_COUNTS = {"unet": 2_259_526_660, "text_encoder_2": 694_659_840, "vae": 83_653_863}


@pytest.fixture(scope="module")
def refiner():
    from conftest import FIXTURES

    return StableDiffusion.load(FIXTURES / "sdxl_refiner")


def test_folder_loads_as_refiner(refiner, fixtures_dir):
    comps = refiner.components
    assert comps.refiner and comps.sdxl and comps.requires_aesthetics_score and refiner.is_sdxl
    assert comps.text_names == ("text_encoder_2",) and len(comps.tokenizers) == 1
    assert sorted(refiner.params) == ["text_encoder_2", "unet", "vae"]
    assert comps.tokenizers[0].pad_token == "!"  # tokenizer_2's (the base's tokenizer pads with <|endoftext|>)
    base = StableDiffusion.load(fixtures_dir / "sdxl").components
    assert not base.refiner and not base.requires_aesthetics_score and base.sdxl


def test_refiner_time_ids_are_diffusers(refiner):
    """(orig h, w, crop top, left, aesthetic score): 5 ids, the negative side with the negative score."""
    start = refiner_start(refiner)
    assert start.extra["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 6.0]]
    assert start.uncond_extra["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 2.5]]
    ids = C.refiner_time_ids((40, 48), (0, 0), jnp.asarray([6.0, 7.0]))
    assert ids.tolist() == [[40, 48, 0, 0, 6], [40, 48, 0, 0, 7]]
    assert C.sdxl_time_ids((32, 32), (0, 0), (32, 32)).tolist() == [[32, 32, 0, 0, 32, 32]]


def refiner_start(pipe):
    from sd_jax.pipelines import starts

    start = starts.txt2img(pipe, jax.random.key(0), 1, 32, 32)
    return starts.micro_conditioning(pipe, start)


def test_cutoff_step_is_diffusers(refiner):
    """Euler, leading spacing, 10 steps: timesteps 901..1; denoising_end 0.8 cuts at 200: 8 base steps."""
    grid = refiner._grid("euler", 10)
    assert np.asarray(grid.ts[:-1]).round().astype(int).tolist() == list(range(901, 0, -100))
    assert cutoff_step(grid, 0.8) == 8 and cutoff_step(grid, 0.7) == 7 and cutoff_step(grid, 0.05) == 0
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            cutoff_step(grid, bad)


def test_order_two_split_is_refused(refiner):
    with pytest.raises(ValueError, match="order-2 heun"):
        refiner.img2img(["x"], np.zeros((1, 4, 4, 4), np.float32), steps=4, sampler="heun", denoising_start=0.8)


def test_every_mode_gives_the_refiner_its_time_ids(refiner):
    """txt2img, denoise and interpolate on a refiner run (its U-Net takes 5 time ids, not SDXL's 6)."""
    photo = np.full((32, 32, 3), 0.5, np.float32)
    assert refiner.txt2img(["x"], height=32, width=32, steps=2)[0].shape == (1, 32, 32, 3)
    assert refiner.denoise(["x"], photo, noise_level=1.0, steps=2)[0].shape == (1, 32, 32, 3)
    assert refiner.interpolate("x", frames=2, height=32, width=32, steps=2)[0].shape == (2, 32, 32, 3)


def test_output_type_is_checked(refiner):
    with pytest.raises(ValueError, match="output_type"):
        refiner.txt2img(["x"], steps=2, output_type="pil")


# -- single file --


@pytest.fixture(scope="module")
def refiner_file():
    from conftest import FIXTURES

    return FIXTURES / "single_file" / "sdxl_refiner.safetensors"


def test_single_file_equals_folder(refiner_file, fixtures_dir):
    """tools/make_refiner_fixtures.py wrote it and checked diffusers' from_single_file reads the folder's tensors."""
    folder = fixtures_dir / "sdxl_refiner"
    ours = load_single_file(refiner_file, config_dir=folder)
    want = load_checkpoint(folder)
    assert sorted(ours.models) == sorted(want.models) == ["text_encoder_2", "unet", "vae"]
    for name in want.models:
        a, b = jax.tree.leaves(ours.params(name)), jax.tree.leaves(want.params(name))
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), name
    comps, _ = C.from_checkpoint(ours)
    assert comps.refiner and comps.requires_aesthetics_score


def test_single_file_exports_to_a_refiner_folder(refiner_file, fixtures_dir, tmp_path):
    """single file -> diffusers folder (save_checkpoint) -> a refiner again, with its index; save_components too."""
    from sd_jax.loading.export import save_checkpoint, save_components

    out = save_checkpoint(tmp_path / "r", load_single_file(refiner_file, config_dir=fixtures_dir / "sdxl_refiner"))
    index = read_json(out / "model_index.json")
    assert index["requires_aesthetics_score"] is True and index["text_encoder"] == [None, None]
    comps, params = C.load(out)
    assert comps.refiner and comps.requires_aesthetics_score
    again = read_json(save_components(tmp_path / "c", comps, params) / "model_index.json")
    assert again["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and again["requires_aesthetics_score"]
    assert C.load(tmp_path / "c")[0].refiner


def test_single_file_is_detected_as_refiner(refiner_file):
    from sd_jax.loading.safetensors_io import read_safetensors

    state = read_safetensors(refiner_file)
    assert sf.detect_architecture(state) == "sdxl_refiner"
    assert any(k.startswith("conditioner.embedders.0.model.transformer.") for k in state)
    assert not any(k.startswith("conditioner.embedders.1.") for k in state)


def test_tiny_single_file_without_configs_names_the_shipped_ones(refiner_file):
    with pytest.raises(errors.CheckpointError, match="sdxl_refiner configs.*config_dir"):
        load_single_file(refiner_file)


def test_base_layout_is_not_the_refiner(fixtures_dir):
    from sd_jax.loading.safetensors_io import read_safetensors

    assert sf.detect_architecture(read_safetensors(fixtures_dir / "single_file" / "sdxl.safetensors")) == "sdxl"
    with pytest.raises(errors.UnsupportedArchitectureError, match="sdxl_refiner has no text_encoder"):
        sf.key_map("text_encoder", sf.Layout("sdxl_refiner", None, (), 0, (32,)))


# -- full size --


@pytest.mark.parametrize("sub", sorted(REFINER_COUNTS))
def test_full_size_parameter_count(sub):
    import test_full_size_maps as full

    _, params = full.ours("sdxl_refiner", sub)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == REFINER_COUNTS[sub]


@pytest.mark.live
@pytest.mark.parametrize("sub", sorted(REFINER_COUNTS))
def test_full_size_maps_one_to_one(sub, monkeypatch):
    """Every diffusers/transformers parameter of the real refiner fills exactly one of ours, same shape."""
    import test_full_size_maps as full

    monkeypatch.setitem(full.EXPECTED, ("sdxl_refiner", sub), REFINER_COUNTS[sub])
    full.test_every_diffusers_parameter_maps_one_to_one("sdxl_refiner", sub)


# The original layout at full size: tests/test_single_file.py's test_full_size_key_map_covers_our_models and
# test_full_size_layout_matches_diffusers_converters (slow) run the sdxl_refiner configs too.
