"""An LCM-distilled U-Net (``time_cond_proj_dim``) against diffusers' ``LatentConsistencyModelPipeline``.

Guidance enters such a U-Net only as ``timestep_cond``, the embedding of ``guidance_scale - 1``; there is no
classifier-free guidance batch. The fixture is built here from the sd1 fixture: a tiny random U-Net with
``time_cond_proj_dim`` and an ``LCMScheduler``.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from test_pipelines import PROMPTS, TOL, torch_latents, unit_noise

from sd_jax.pipelines.conditioning import guidance_scale_embedding
from sd_jax.pipelines.pipeline import StableDiffusion

PROJ_DIM = 8


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    import diffusers
    import torch
    from conftest import FIXTURES

    folder = tmp_path_factory.mktemp("lcm") / "lcm"
    shutil.copytree(FIXTURES / "sd1", folder, ignore=shutil.ignore_patterns("safety_checker", "feature_extractor"))
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config({**cfg, "time_cond_proj_dim": PROJ_DIM})
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    sched = diffusers.LCMScheduler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    sched.save_config(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    for k in ("safety_checker", "feature_extractor"):
        index.pop(k)
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"],
                 requires_safety_checker=False)  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.live
def test_guidance_scale_embedding_matches_diffusers():
    import diffusers
    import torch

    w = np.array([0.0, 1.5, 7.5], np.float32)
    for dim in (8, 9, 256):
        ref = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), dim)
        # float32 sin/cos of arguments up to 7500: one ulp of the argument (numpy's exp vs torch's) is ~5e-4
        np.testing.assert_allclose(guidance_scale_embedding(w, dim), ref.numpy(), atol=1e-3)


@pytest.mark.live
@pytest.mark.parametrize("guidance_scale", [8.5, 2.0])
def test_lcm_unet_matches_diffusers(lcm_folder, guidance_scale, monkeypatch):
    import diffusers
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    steps, seed = 4, 3
    pipe = StableDiffusion.load(lcm_folder)
    assert pipe.default_sampler == "lcm" and pipe.unet.config.time_cond_proj_dim == PROJ_DIM
    noise = unit_noise((2, 8, 8, 4), 7)
    ours, _ = pipe.txt2img(PROMPTS, steps=steps, guidance_scale=guidance_scale, seed=seed, noise=noise)

    # the noise LCMScheduler adds between steps: the pipeline's step i draws fold_in(fold_in(key(seed), 2), i)
    sample_key = jax.random.fold_in(jax.random.key(seed), 2)
    draws = iter(np.asarray(jax.random.normal(jax.random.fold_in(sample_key, i), noise.shape)) for i in range(steps))
    monkeypatch.setattr(lcm_mod, "randn_tensor", lambda shape, **kw: torch_latents(next(draws)))
    ref_pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        lcm_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale, latents=torch_latents(noise),
                   height=32, width=32, output_type="np").images  # fmt: skip
    err = float(np.abs(ours - ref).max())
    print(f"lcm guidance {guidance_scale}: max abs pixel err {err:.2e}")
    assert ours.shape == ref.shape == (2, 32, 32, 3)
    assert err <= TOL
