"""(h) of ``python -m bench``: device memory from XLA's compiled memory analysis, with nothing allocated."""

import pytest

from bench import memory_scale
from bench.harness import OURS, Settings
from tests.conftest import FIXTURES


def test_sampling_memory_grows_with_the_batch_and_counts_the_weights():
    spec = {"task": "sampling", "folder": str(FIXTURES / "sdxl"), "image_size": 64, "dtype": "bfloat16"}
    one, eight = (memory_scale.measure({**spec, "batch": b}) for b in (1, 8))
    assert "error" not in one, one
    assert one["weights"] > 0 and one["unet_step"] > 0 and one["vae_decode"] > 0
    assert eight["unet_step"] > 2 * one["unet_step"]  # activations scale with the batch; the weights do not
    assert eight["weights"] == one["weights"]
    assert one["peak"] >= max(one["unet_step"], one["vae_decode"])


@pytest.mark.slow
def test_fsdp_training_needs_less_memory_per_device_than_dp():
    overrides = {"batch_size": 8, "compute_dtype": "float32", "remat_policy": None}
    spec = {"task": "training", "folder": str(FIXTURES / "sd1"), "config": "configs/sd15_finetune.py",
            "overrides": overrides, "image_size": 32}  # fmt: skip
    dp = memory_scale.measure({**spec, "sharding": "dp", "mesh": [8, 1, 1]})
    fsdp = memory_scale.measure({**spec, "sharding": "fsdp", "mesh": [1, 8, 1]})
    assert "error" not in dp and "error" not in fsdp, (dp, fsdp)
    assert dp["batch_per_device"] == fsdp["batch_per_device"] == 1
    assert fsdp["step"] < dp["step"], (fsdp, dp)  # the weights, Adam moments and EMA are split 8 ways


@pytest.mark.slow
def test_quick_family_writes_both_tables():
    st = Settings(quick=True, repeats=1, contenders=(OURS,))
    sampling, training = memory_scale.run(st, {})
    assert len(sampling.rows) == 2 and len(training.rows) == 6
    assert all("n/a" not in r[4] for r in sampling.rows), sampling.rows
    assert all("n/a" not in r[1] for r in training.rows), training.rows
