"""Fine-tuning configs: the objective comes from the checkpoint (SD 2.1 trains v-prediction), the tokenizer too,
and the SDXL config is the pod-sized one unless ``runlocal``."""

import importlib
import pathlib

import pytest

from sd_jax.training.model import build

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def finetune(name, fixture, arg=None, **kw):
    mod = importlib.import_module(f"configs.{name}")
    c = mod.get_config(arg) if arg else mod.get_config()
    c.unlock()
    c.init_from = str(FIXTURES / fixture)
    c.compute_dtype = "float32"
    c.update_from_flattened_dict(kw)  # "optim.lr"-style keys
    return c


@pytest.mark.parametrize(
    "name,fixture,expected",
    [
        ("sd15_finetune", "sd1", "epsilon"),
        ("sd21_finetune", "sd2", "v_prediction"),
        ("sdxl_finetune", "sdxl", "epsilon"),
    ],
)
def test_prediction_type_comes_from_the_checkpoint(name, fixture, expected):
    comps, _ = build(finetune(name, fixture))
    assert comps.schedule.prediction_type == expected


def test_prediction_type_override_and_sd2_tokenizer():
    comps, _ = build(finetune("sd15_finetune", "sd1", **{"objective.prediction_type": "v_prediction"}))
    assert comps.schedule.prediction_type == "v_prediction"
    (tok,) = build(finetune("sd21_finetune", "sd2"))[0].tokenizers
    assert tok.pad_token == "!"  # the checkpoint's own tokenizer, not the shipped SD 1 one


def test_sdxl_config_sizes():
    from configs import sdxl_finetune

    c = sdxl_finetune.get_config()
    assert (c.data.image_size, c.compute_dtype, c.sharding, c.mesh.fsdp) == (1024, "bfloat16", "fsdp", -1)
    assert c.remat_policy and c.objective.prediction_type == "" and c.data.random_crop
    local = sdxl_finetune.get_config("runlocal")
    assert local.init_from == "tests/fixtures/sdxl" and local.data.source == "synthetic"
    with pytest.raises(ValueError, match="unknown variant 'bogus'"):
        sdxl_finetune.get_config("bogus")
