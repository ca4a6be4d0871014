"""Test setup: 8 simulated CPU devices, no network, and shared helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in tests: jaxlib 0.10.2's CPU executable (de)serialization crashed CI twice
# (an abort writing, a segfault reading). sample.py's main() runs in-process in tests: keep it from turning one on.
os.environ["SD_JAX_CACHE"] = ""
# model/LoRA hashes are cached in a file of this session's, not in the user's ~/.cache/sd_jax/hashes.json
os.environ["SD_JAX_HASH_CACHE"] = os.path.join(__import__("tempfile").mkdtemp(prefix="sd_jax_hashes_"), "hashes.json")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def has_reference() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def fixed_batch_loss(trainer, frozen, batch, draws: int):
    """``params -> mean loss`` of ``trainer`` on one fixed batch over ``draws`` fixed noise/timestep keys: the same
    images, noise and timesteps before and after training, so a drop is learning, not sampling luck."""
    one = jax.jit(lambda params, key: trainer.loss(params, frozen, batch, key)[0])
    return lambda params: float(sum(float(one(params, jax.random.key(k))) for k in range(draws)) / draws)


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def pytest_collection_modifyitems(config, items):
    if has_reference():
        return
    skip = pytest.mark.skip(reason="needs the reference extra (torch==2.13.0, diffusers)")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code_after_each_module():
    """Each xdist worker runs hundreds of modules in one process; without this, every module's compiled
    executables stay cached and a worker's memory grows past 9 GB by the end of the run."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
