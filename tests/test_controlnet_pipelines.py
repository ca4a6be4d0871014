"""ControlNet pipelines against diffusers' (tools/make_controlnet_pipeline_fixtures.py): txt2img, img2img, inpaint
(9-channel and blending) and SDXL, DDIM/Euler/DPM++ 2M, one and two nets, guess mode and guidance start/end, from
the same latents; plus the checks that make those comparisons able to fail. No torch needed."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from sd_jax.pipelines.pipeline import StableDiffusion

REF = np.load(FIXTURES / "reference" / "controlnet_pipelines.npz")
CASES = {c["name"]: c for c in json.loads(str(REF["cases"]))}
TOL = 2e-3  # max abs error on [0, 1] pixels
_PIPES: dict = {}


def pipe_for(base: str, nets: tuple) -> StableDiffusion:
    if (base, nets) not in _PIPES:
        _PIPES[(base, nets)] = StableDiffusion.load(
            FIXTURES / base, controlnet=[FIXTURES / "controlnet" / n for n in nets]
        )
    return _PIPES[(base, nets)]


def inp(name):
    return REF[f"input/{name}"]


def run(c, **override):
    c = {**c, **override}
    pipe = pipe_for(c["base"], tuple(c["nets"]))
    controls = [inp(k) for k in c["controls"]]
    kw = dict(
        steps=c["steps"], sampler=c["sampler"], guidance_scale=c["guidance_scale"], negative=c.get("negative"),
        control_image=controls, controlnet_conditioning_scale=c["scale"], control_guidance_start=c["start"],
        control_guidance_end=c["end"], guess_mode=c["guess"], noise=jnp.asarray(inp(c["noise"])),
    )  # fmt: skip
    if c["mode"] in ("txt2img", "sdxl"):
        return pipe.txt2img(c["prompts"], height=c.get("height"), width=c.get("width"), **kw)[0]
    photo = inp("photo")
    if c["mode"] == "img2img":
        z0 = pipe.encode(photo[None])
        return pipe.img2img(c["prompts"], photo, strength=c["strength"], init_latents=z0, **kw)[0]
    mask = inp("mask")
    z_img = pipe.encode(photo[None])
    z_masked = pipe.encode((photo * (1 - mask) + 0.5 * mask)[None])
    return pipe.inpaint(c["prompts"], photo, mask, image_latents=z_img, masked_image_latents=z_masked, **kw)[0]


def ref(name):
    return REF[f"image/{name}"].astype(np.float32) / 65535


@pytest.mark.parametrize("name", CASES)
def test_matches_diffusers(name):
    ours = run(CASES[name])
    want = ref(name)
    assert ours.shape == want.shape
    err = float(np.abs(ours - want).max())
    print(f"{name}: max abs pixel err {err:.2e}")
    assert err <= TOL, err


@pytest.mark.parametrize("name", ["txt2img_ddim", "img2img_euler", "inpaint4_euler"])
def test_scale_zero_is_the_plain_pipeline(name):
    c = CASES[name]
    off = run(c, scale=0.0)
    pipe = pipe_for(c["base"], tuple(c["nets"]))
    kw = dict(steps=c["steps"], sampler=c["sampler"], guidance_scale=c["guidance_scale"], negative=c.get("negative"),
              noise=jnp.asarray(inp(c["noise"])))  # fmt: skip
    photo = inp("photo")
    if c["mode"] == "txt2img":
        plain = pipe.txt2img(c["prompts"], **kw)[0]
    elif c["mode"] == "img2img":
        plain = pipe.img2img(c["prompts"], photo, strength=c["strength"], init_latents=pipe.encode(photo[None]), **kw)[
            0
        ]
    else:
        mask = inp("mask")
        plain = pipe.inpaint(c["prompts"], photo, mask, image_latents=pipe.encode(photo[None]), **kw)[0]
    np.testing.assert_allclose(off, plain, atol=1e-6)
    assert np.abs(ref(name) - plain).max() > 10 * TOL  # the ControlNet matters in the reference


def test_control_changes_the_output_without_recompiling():
    c = CASES["txt2img_multi"]
    pipe = pipe_for(c["base"], tuple(c["nets"]))
    pipe._compiled.clear()
    a = run(c)
    b = run(c, scale=[0.2, 0.4], start=[0.0, 0.0], end=[1.0, 0.4], controls=["soft", "edges"], guess=True)
    assert np.abs(a - b).max() > 10 * TOL
    (fn,) = pipe._compiled.values()
    assert fn._cache_size() == 1
    # keep = 0 at every step (a window that never opens for 5 steps) is the plain pipeline
    closed = run(c, start=[0.0, 0.0], end=[0.1, 0.1])
    plain = pipe.txt2img(c["prompts"], steps=c["steps"], sampler=c["sampler"], guidance_scale=c["guidance_scale"],
                         noise=jnp.asarray(inp(c["noise"])))[0]  # fmt: skip
    np.testing.assert_allclose(closed, plain, atol=1e-6)


def test_micro_batches_match():
    c = CASES["txt2img_euler"]
    whole = run(c)
    pipe = pipe_for(c["base"], tuple(c["nets"]))
    micro = pipe.txt2img(c["prompts"], steps=c["steps"], sampler=c["sampler"], guidance_scale=c["guidance_scale"],
                         negative=c["negative"], noise=jnp.asarray(inp(c["noise"])), micro_batch=1,
                         control_image=inp("edges"), controlnet_conditioning_scale=c["scale"])[0]  # fmt: skip
    np.testing.assert_allclose(micro, whole, atol=1e-5)


def test_bad_requests_are_clear_errors_before_compute():
    pipe = pipe_for("sd1", ("sd1", "sd1_b"))
    e = inp("edges")
    with pytest.raises(ValueError, match="1 control image.* for 2 ControlNet"):
        pipe.txt2img("x", control_image=e, steps=2)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 values for 2"):
        pipe.txt2img("x", control_image=[e, e], controlnet_conditioning_scale=[1, 1, 1], steps=2)
    with pytest.raises(ValueError, match="control_guidance_start 0.5 and control_guidance_end 0.5"):
        pipe.txt2img("x", control_image=[e, e], control_guidance_start=0.5, control_guidance_end=0.5, steps=2)
    with pytest.raises(ValueError, match="control image nope.png: cannot be read"):
        pipe.txt2img("x", control_image=["nope.png", e], steps=2)
    plain = pipe_for("sd1", ())
    with pytest.raises(ValueError, match="no ControlNet is loaded"):
        plain.txt2img("x", control_image=e, steps=2)


def test_a_controlnet_of_another_base_is_refused():
    from sd_jax.errors import UnsupportedArchitectureError

    pipe = pipe_for("sd1", ())
    with pytest.raises(UnsupportedArchitectureError, match="controlnet/sdxl: ControlNet cross_attention_dim=64"):
        pipe.load_controlnet(FIXTURES / "controlnet" / "sdxl")
    assert not pipe.controlnets and "controlnet" not in pipe.params  # nothing half-applied
