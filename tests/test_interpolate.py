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
