"""The attention kernels of :mod:`sd_jax.models.attention_kernels`: chosen in config, equal to the XLA path.

The Pallas TPU flash kernel runs here in Pallas's TPU interpret mode (on the CPU), forward and gradient, at SD
shapes scaled down: self-attention over a latent grid, cross-attention to 77 text tokens (padded to the kernel's
128-blocks and masked), and CLIP's causal attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models import attention_kernels as K

CASES = {  # (batch, query tokens, key tokens, heads, head size, causal)
    "self_16x16": (1, 256, 256, 2, 40, False),
    "cross_77": (2, 64, 77, 2, 64, False),
    "causal_77": (1, 77, 77, 2, 32, True),
}


@pytest.fixture
def tpu_interpret():
    from jax._src import config
    from jax.experimental.pallas import tpu as pltpu

    pltpu.set_tpu_interpret_mode()
    yield
    config.pallas_tpu_interpret_mode_context_manager.set_global(None)


def _qkv(b, tq, tk, n, hd, seed=0):
    key = jax.random.key(seed)
    return tuple(jax.random.normal(jax.random.fold_in(key, i), (b, t, n, hd)) for i, t in enumerate((tq, tk, tk)))


def test_auto_resolves_by_backend_and_names_are_checked():
    assert K.resolve("auto", "cpu") == "blocked"
    assert K.resolve("auto", "gpu") == "cudnn"
    assert K.resolve("auto", "tpu") == "flash"
    assert K.resolve("auto", "metal") == "xla"
    assert K.resolve("auto") == "blocked"  # these tests run on the CPU
    assert K.resolve("cudnn") == "cudnn"
    with pytest.raises(ValueError, match="attention 'splash': choose auto or one of xla, blocked, cudnn, flash"):
        K.resolve("splash")


@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_kernel_matches_xla_forward_and_gradient(tpu_interpret, case):
    b, tq, tk, n, hd, causal = CASES[case]
    q, k, v = _qkv(b, tq, tk, n, hd)
    want = K.attend(q, k, v, kernel="xla", is_causal=causal)
    got = K.attend(q, k, v, kernel="flash", is_causal=causal)
    assert got.shape == (b, tq, n, hd)
    np.testing.assert_allclose(got, want, atol=2e-6)
    w = jax.random.normal(jax.random.key(9), want.shape)  # a fixed cotangent

    def grads(kernel):
        loss = lambda *a: (K.attend(*a, kernel=kernel, is_causal=causal) * w).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for g, r in zip(grads("flash"), grads("xla")):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_blocked_and_cudnn_paths_on_cpu_match_xla():
    q, k, v = _qkv(2, 64, 77, 2, 40)
    want = K.attend(q, k, v, kernel="xla")
    np.testing.assert_allclose(K.attend(q, k, v, kernel="blocked"), want, atol=2e-6)
    # cuDNN takes bf16/fp16 heads up to 128 only: fp32 and the VAE's 512-wide head run on the XLA path instead
    assert not K._cudnn_takes(q, None)
    assert K._cudnn_takes(q.astype(jnp.bfloat16), None)
    assert not K._cudnn_takes(jnp.zeros((1, 16, 1, 512), jnp.bfloat16), None)
    np.testing.assert_allclose(K.attend(q, k, v, kernel="cudnn"), want, atol=0)
    mask = jnp.tril(jnp.ones((64, 77), bool))[None, None]
    np.testing.assert_allclose(K.attend(q, k, v, kernel="blocked", mask=mask),
                               K.attend(q, k, v, kernel="xla", mask=mask), atol=2e-6)  # fmt: skip


def test_the_configured_kernel_reaches_every_attention_layer(tpu_interpret, fixtures_dir):
    """The tiny SD 1.x U-Net with ``attention="flash"`` (the Pallas kernel, interpreted) gives the XLA U-Net's output,
    and a kernel name the layers do not know fails at trace time: the option is really read by the layers."""
    from sd_jax import components as C

    comps, params = C.load(fixtures_dir / "sd1", attention="xla")
    unet = comps.unet
    assert unet.attention == "xla" and comps.vae.attention == "xla"
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, unet.config.in_channels))
    ctx = jax.random.normal(jax.random.key(1), (1, 77, unet.config.cross_attention_dim))
    want = unet.apply({"params": params["unet"]}, x, jnp.array([500.0]), ctx)
    got = unet.clone(attention="flash").apply({"params": params["unet"]}, x, jnp.array([500.0]), ctx)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="attention kernel 'nope'"):
        unet.clone(attention="nope").apply({"params": params["unet"]}, x, jnp.array([500.0]), ctx)
    assert C.load(fixtures_dir / "sd1")[0].unet.attention == "blocked"  # auto, on the CPU
