"""SDXL img2img, inpaint, the refiner and the base->refiner handoff against diffusers' reference images.

The references (tests/fixtures/reference/sdxl_refiner.npz) come from tools/make_refiner_fixtures.py: diffusers'
``StableDiffusionXLImg2ImgPipeline`` (the tiny refiner of tests/fixtures/sdxl_refiner, and the SDXL base),
``StableDiffusionXLInpaintPipeline`` and the ensemble of experts (base ``denoising_end=0.8,
output_type="latent"``, refiner ``denoising_start=0.8``), from the same noise and VAE posterior means as ours.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.pipelines.pipeline import StableDiffusion

TOL = 2e-3  # max abs error on [0, 1] pixels


@pytest.fixture(scope="module")
def ref():
    from conftest import FIXTURES

    data = np.load(FIXTURES / "reference" / "sdxl_refiner.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def pipes():
    from conftest import FIXTURES

    return {"base": StableDiffusion.load(FIXTURES / "sdxl"), "refiner": StableDiffusion.load(FIXTURES / "sdxl_refiner")}


def _cases(ref_path=None):
    from conftest import FIXTURES

    return {c["name"]: c for c in json.loads(str(np.load(FIXTURES / "reference" / "sdxl_refiner.npz")["cases"]))}


CASES = _cases()


def _image(ref, name):
    return ref[f"image/{name}"].astype(np.float32) / 65535


def _err(name, ours, want):
    err = float(np.abs(np.asarray(ours) - want).max())
    print(f"{name}: max abs pixel err {err:.2e}")
    assert ours.shape == want.shape
    return err


def run_case(c, pipes, ref):
    """Our side of one case: ``(images, base latents or None)``."""
    kw = dict(steps=c["steps"], sampler=c["sampler"], guidance_scale=c["guidance_scale"], negative=c["negative"])
    photo = ref["input/photo"]
    if c["mode"] == "handoff":
        noise = ref["input/n2" if len(c["prompts"]) == 2 else "input/n1"]
        lat, _ = pipes["base"].txt2img(c["prompts"], noise=jnp.asarray(noise), denoising_end=c["split"],
                                       output_type="latent", **kw)  # fmt: skip
        images, _ = pipes["refiner"].img2img(c["prompts"], lat, denoising_start=c["split"], **kw)
        return images, np.asarray(lat)
    if c["mode"] == "sdxl_inpaint":
        pipe = pipes["base"]
        mask = ref["input/mask"]
        images, _ = pipe.inpaint(c["prompts"], photo, mask, noise=jnp.asarray(ref["input/n1"]),
                                 image_latents=pipe.encode(photo[None]), **kw)  # fmt: skip
        return images, None
    pipe = pipes["refiner" if c["mode"] == "refiner_img2img" else "base"]
    scores = {k: c[k] for k in ("aesthetic_score", "negative_aesthetic_score") if k in c}
    images, _ = pipe.img2img(c["prompts"], photo, strength=c["strength"], noise=jnp.asarray(ref["input/n1"]),
                             init_latents=pipe.encode(photo[None]), **scores, **kw)  # fmt: skip
    return images, None


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_diffusers(name, pipes, ref):
    c = CASES[name]
    images, lat = run_case(c, pipes, ref)
    assert _err(name, images, _image(ref, name)) <= TOL
    if lat is not None:  # the base's half of the handoff: diffusers' output_type="latent" latents
        want = ref[f"latents/{name}"]
        assert lat.shape == want.shape
        assert float(np.abs(lat - want).max()) <= 1e-3 * max(1.0, float(np.abs(want).max()))


def test_aesthetic_scores_change_the_refiner(pipes, ref):
    """The aesthetic scores reach the U-Net: other scores, another image (so the parity above tests them)."""
    c = dict(CASES["refiner_img2img_euler"])
    a, _ = run_case(c, pipes, ref)
    b, _ = run_case({**c, "aesthetic_score": 9.0, "negative_aesthetic_score": 0.0}, pipes, ref)
    assert float(np.abs(a - b).max()) > 1e-2


def test_handoff_latents_are_mid_schedule(pipes, ref):
    """The base stops early: its denoising_end latents are not the full run's (nor the reference's without it)."""
    c = CASES["handoff_euler"]
    kw = dict(steps=c["steps"], sampler=c["sampler"], guidance_scale=c["guidance_scale"])
    noise = jnp.asarray(ref["input/n2"])
    full, _ = pipes["base"].txt2img(c["prompts"], noise=noise, output_type="latent", **kw)
    cut, _ = pipes["base"].txt2img(c["prompts"], noise=noise, output_type="latent", denoising_end=0.8, **kw)
    assert float(np.abs(np.asarray(cut) - ref["latents/handoff_euler"]).max()) <= 1e-3
    assert float(np.abs(np.asarray(full) - np.asarray(cut)).max()) > 0.1


@pytest.mark.live
def test_live_diffusers_handoff_matches_ours(pipes, ref):
    """diffusers re-run now (tools/make_refiner_fixtures.py's own code): the stored reference still holds."""
    import sys

    from conftest import FIXTURES

    sys.path.insert(0, str(FIXTURES.parents[1] / "tools"))
    import make_refiner_fixtures as make

    c = CASES["handoff_dpmpp_2m"]
    theirs, lat = make.run(c, ref)
    ours, our_lat = run_case(c, pipes, ref)
    assert _err("live handoff_dpmpp_2m", ours, np.asarray(theirs, np.float32)) <= TOL
    assert float(np.abs(our_lat - lat).max()) <= 1e-3
