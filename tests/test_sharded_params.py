"""Sampling with sharded weights (``StableDiffusion.load(mesh=..., sharding=...)``, ``sample.py --sharding``): on 8
simulated devices the images equal the replicated run, and each device holds about 1/N of the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import placement
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.sharding import make_mesh
from tests.test_pipelines import PROMPTS, unit_noise

MESHES = {"fsdp": (1, 8, 1), "fsdp_tp": (1, 4, 2)}


@pytest.fixture(scope="module")
def replicated(fixtures_dir_module):
    pipe = StableDiffusion.load(fixtures_dir_module / "sd1", mesh=make_mesh((-1, 1, 1)))
    noise = jnp.asarray(unit_noise((8, 8, 8, 4), 6))
    prompts = [PROMPTS[i % 2] for i in range(8)]
    images, _ = pipe.txt2img(prompts, steps=3, noise=noise)
    return pipe, noise, prompts, images


@pytest.fixture(scope="module")
def fixtures_dir_module():
    from tests.conftest import FIXTURES

    return FIXTURES


@pytest.mark.parametrize("strategy", sorted(MESHES))
def test_sharded_weights_give_the_replicated_images(replicated, fixtures_dir_module, strategy):
    base, noise, prompts, want = replicated
    mesh = make_mesh(MESHES[strategy])
    pipe = StableDiffusion.load(fixtures_dir_module / "sd1", mesh=mesh, sharding=strategy)
    assert pipe.sharding == strategy
    total = sum(a.nbytes for a in jax.tree.leaves(pipe.params["unet"]))
    per_device = placement.bytes_per_device(pipe.params["unet"])
    assert len(per_device) == 8
    split = 8 if strategy == "fsdp" else 4  # fsdp_tp: the fsdp axis (4) splits everything, tensor (2) some more
    # about 1/N of the whole: the kernels split, only the small norms and biases that no axis divides stay whole
    assert max(per_device.values()) <= 1.25 * total / split, (max(per_device.values()), total)
    replicated_bytes = placement.bytes_per_device(base.params["unet"])
    assert min(replicated_bytes.values()) == total  # the default lays a full copy on every device
    kernel = pipe.params["unet"]["conv_in"]["kernel"]
    assert kernel.sharding.spec != jax.sharding.PartitionSpec(), kernel.sharding  # really split
    got, _ = pipe.txt2img(prompts, steps=3, noise=noise)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sharding_needs_a_mesh(fixtures_dir_module):
    pipe = StableDiffusion.load(fixtures_dir_module / "sd1")
    with pytest.raises(ValueError, match="needs a mesh"):
        pipe.shard("fsdp")
    pipe.mesh = make_mesh((1, 8, 1))
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero3'"):
        pipe.shard("zero3")


def test_sample_cli_sharding_flags(tmp_path, fixtures_dir_module, capsys):
    from sd_jax.cli import sample

    argv = ["--model", str(fixtures_dir_module / "sd1"), "--prompt", "a red circle", "--steps", "2", "--height", "64",
            "--width", "64", "--seed", "3", "--no-safety-checker"]  # fmt: skip
    argv += ["--output-dir", str(tmp_path / "bad")]
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "--mesh", "3,1,1"])
    assert e.value.code == 2
    assert "--mesh 3,1,1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "--mesh", "2,x"])
    assert e.value.code == 2 and "DATA,FSDP,TENSOR" in capsys.readouterr().err
    argv = argv[:-2]
    sample.main([*argv, "--mesh", "1,8,1", "--sharding", "fsdp", "--output-dir", str(tmp_path / "fsdp")])
    sample.main([*argv, "--output-dir", str(tmp_path / "dp")])
    from PIL import Image

    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("*.png"))), np.float32) for d in ("fsdp", "dp"))
    assert a.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 1.0  # the same image, up to one 8-bit level of fp32 rounding
