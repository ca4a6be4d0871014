"""The convolution algorithms (sd_jax.models.conv_kernels) against XLA's convolution, forward and gradient, and
the ``cpu`` rule's choices; a U-Net built with each gives the same output."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models import conv_kernels as ck


def _conv(kernel: str, features: int, **kw):
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=ck.get(kernel), **kw)


@pytest.mark.parametrize("kernel", ["im2col", "shifted", "cpu"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 512), (2, 12, 10, 24)])
def test_algorithms_equal_xla_forward_and_gradient(kernel, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    ref, alt = _conv("xla", 32), _conv(kernel, 32)
    params = ref.init(jax.random.key(1), x)
    y0, y1 = ref.apply(params, x), alt.apply(params, x)
    scale = float(jnp.abs(y0).max())
    assert float(jnp.abs(y1 - y0).max()) <= 1e-5 * scale
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
    g0 = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    g1 = jax.grad(loss(alt), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert float(jnp.abs(a - b).max()) <= 1e-4 * float(jnp.abs(a).max())


def test_the_cpu_rule_and_what_stays_on_xla():
    assert [ck.cpu_choice(h, h, c) for h, c in [(64, 320), (32, 640), (16, 1280), (8, 1280), (8, 2560), (8, 128)]] == [
        "xla", "xla", "xla", "im2col", "im2col", "xla"]  # fmt: skip
    calls = []
    real = ck.im2col
    ck.im2col = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        x = jax.random.normal(jax.random.key(0), (1, 8, 8, 512))
        for m in (_conv("cpu", 8), nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                                           conv_general_dilated=ck.get("cpu")),
                  nn.Conv(8, (1, 1), conv_general_dilated=ck.get("cpu"))):  # fmt: skip
            params = m.init(jax.random.key(1), x)
            calls.clear() if m.strides is None and m.kernel_size == (3, 3) else None
            m.apply(params, x)
            if m.kernel_size == (3, 3) and m.strides is None:
                assert calls == [(1, 8, 8, 512)]
            calls.clear()
    finally:
        ck.im2col = real
    assert calls == []  # the 3x3 stride-1 conv only: the strided and 1x1 convs stayed on XLA
    assert ck.resolve("auto", "cpu") == "cpu" and ck.resolve("auto", "gpu") == "xla"
    with pytest.raises(ValueError, match="conv 'fast'"):
        ck.resolve("fast")


def test_unet_output_is_the_same_with_each_algorithm():
    from sd_jax.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 1),
                     attention_heads=(4, 4), transformer_layers_per_block=(1, 1), only_cross_attention=(False, False),
                     cross_attention_dim=32, norm_num_groups=8, sample_size=8)  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 7, 32))
    t = jnp.array([10.0, 500.0])
    ref = UNet2DConditionModel(cfg)
    params = ref.init(jax.random.key(2), x, t, ctx)
    y0 = np.asarray(ref.apply(params, x, t, ctx))
    for kernel in ("im2col", "shifted"):
        y1 = np.asarray(UNet2DConditionModel(cfg, conv=kernel).apply(params, x, t, ctx))
        np.testing.assert_allclose(y1, y0, atol=2e-5 * np.abs(y0).max())


def test_config_surfaces_resolve_the_algorithm(fixtures_dir):
    from sd_jax import components as C
    from sd_jax.pipelines.pipeline import StableDiffusion

    assert C.load(fixtures_dir / "sd1")[0].unet.conv == "cpu"  # "auto" on this CPU
    pipe = StableDiffusion.load(fixtures_dir / "sd1", conv="im2col")
    assert pipe.unet.conv == "im2col"
    with pytest.raises(ValueError, match="conv 'fastest': choose auto or one of"):
        C.load(fixtures_dir / "sd1", conv="fastest")
