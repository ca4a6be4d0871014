"""The EMA of the params: the plain recursion, and the warmup of diffusers' EMAModel (parity)."""

import jax
import ml_collections
import numpy as np
import pytest

from sd_jax.training.optim import ema_decay, ema_update


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_recursion_and_diffusers(warmup):
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import EMAModel

    rng = np.random.default_rng(0)
    cfg = ml_collections.ConfigDict({"ema_decay": 0.99, "ema_warmup": warmup})
    params = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(40)]
    ema = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    want = ema["w"].copy()
    ref_param = torch.nn.Parameter(torch.from_numpy(ema["w"].copy()))
    ref = EMAModel([ref_param], decay=0.99)
    for step, p in enumerate(params):
        ema = ema_update(ema, {"w": p}, ema_decay(cfg, step))
        want = (0.99 * want + 0.01 * p) if not warmup else want
        if warmup:
            with torch.no_grad():
                ref_param.copy_(torch.from_numpy(p))
            ref.step([ref_param])
    got = np.asarray(ema["w"])
    if warmup:
        np.testing.assert_allclose(got, ref.shadow_params[0].numpy(), atol=1e-6)
        assert float(ema_decay(cfg, 0)) == 0.0 and abs(float(ema_decay(cfg, 5)) - 6 / 15) < 1e-7
    else:
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert float(ema_decay(cfg, 0)) == np.float32(0.99)


def test_trainer_ema_warmup_starts_at_the_params():
    from configs.tiny import get_config
    from sd_jax.data import make_source
    from sd_jax.sharding import make_mesh
    from sd_jax.tokenizer import load_tokenizer
    from sd_jax.training import loop

    cfg = get_config()
    cfg.batch_size, cfg.optim.ema_warmup = 8, True
    t = loop.Trainer(cfg, mesh=make_mesh({"data": 1}, devices=jax.devices()[:1]))
    state, frozen = t.init_state(), t.frozen()
    state, _ = t.step(state, frozen, make_source(cfg.data, load_tokenizer()).batch(0, cfg.batch_size))
    state = jax.device_get(state)
    assert jax.tree.all(jax.tree.map(np.array_equal, state["ema"], state["params"]))
