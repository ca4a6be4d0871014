"""Spherical interpolation keeps the norm of Gaussian noise and hits both ends."""

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.pipelines.interpolate import slerp, slerp_path


def test_slerp_endpoints_and_norm():
    a = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
    b = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-5)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid, lin = slerp(a, b, 0.5), 0.5 * (a + b)
    na, nm, nl = (float(jnp.linalg.norm(v)) for v in (a, mid, lin))
    assert abs(nm - na) / na < 0.02  # slerp stays on the shell ...
    assert nl / na < 0.8  # ... where the straight line falls inside it


def test_slerp_parallel_is_linear_and_path_shape():
    a = jnp.ones((3,))
    np.testing.assert_allclose(slerp(a, 2 * a, 0.5), 1.5 * a, rtol=1e-5)
    assert slerp_path(a, -a + 0.1, 5).shape == (5, 3)


def test_interpolating_a_long_prompt_with_a_short_one(fixtures_dir):
    """The two prompts have different chunk counts: both are padded to one, and the ends are the prompts' own."""
    from sd_jax.pipelines import starts
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.load(fixtures_dir / "sd1")
    long = ", ".join(["a red circle on a blue background"] * 12)
    st = starts.interpolation(pipe, long, "a cat", 3, 0, 1, 7.5, 32, 32)
    cond, uncond = st.cond
    a, _ = pipe.conditioning([long], None, 7.5, 32, 32)
    assert cond["context"].shape[1] == a["context"].shape[1] > 77  # the long prompt's chunks, for every frame
    np.testing.assert_allclose(cond["context"][0], a["context"][0], atol=2e-6)
    assert uncond["context"].shape == cond["context"].shape
    images, _ = pipe.interpolate(long, "a cat", frames=2, height=32, width=32, steps=2)
    assert images.shape[0] == 2 and np.isfinite(images).all()
