"""ControlNet training (configs/controlnet.py) on the tiny SD1 fixture with "shapes" silhouettes as controls."""

import jax
import numpy as np
import pytest
from conftest import FIXTURES, fixed_batch_loss

from configs.controlnet import get_config
from sd_jax.data import make_source
from sd_jax.loading.controlnet import load_controlnet
from sd_jax.models.controlnet import ControlNetModel
from sd_jax.sharding import make_mesh
from sd_jax.training import loop
from sd_jax.training.checks import ConfigError, check_config


def small_config(tmp_path, **kw):
    c = get_config()
    c.unlock()
    c.init_from = str(FIXTURES / "sd1")
    c.controlnet.conditioning_embedding_out_channels = (8, 16, 16)  # the fixture's VAE downsamples 4x
    c.batch_size, c.steps, c.log_every, c.checkpoint_every = 4, 4, 1, 2
    c.optim.warmup_steps = 0
    c.data.num_train = 64
    c.data.data_dir = str(tmp_path / "tfds")
    c.update_from_flattened_dict(kw)
    return c


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                                jax.tree.leaves(b)))  # fmt: skip


def test_only_the_controlnet_trains_and_its_fixed_batch_loss_falls(tmp_path):
    cfg = small_config(tmp_path, **{"data.caption_dropout": 0.0, "optim.lr": 5e-3})
    t = loop.Trainer(cfg, mesh=one_device())
    assert t.frozen_names == ("unet", "vae", "text_encoder")
    src = make_source(cfg.data, t.tokenizers[0])
    state, frozen = t.init_state(), t.frozen()
    evaluate = fixed_batch_loss(t, frozen, t.put_batch(src.batch(10_000, 8)), draws=8)
    # zero convolutions: the untrained ControlNet leaves the base model's loss exactly as it is
    base = fixed_batch_loss(loop.Trainer(small_config(tmp_path, trainer="diffusion", train=("unet",)),
                                         mesh=t.mesh), frozen, t.put_batch(src.batch(10_000, 8)), draws=8)  # fmt: skip
    start = evaluate(state["params"])
    assert start == pytest.approx(base({"unet": frozen["unet"]}), rel=1e-5)
    before = jax.device_get(state["params"])
    for step in range(40):
        state, _ = t.step(state, frozen, src.batch(step, cfg.batch_size))
    end = evaluate(state["params"])
    print(f"fixed-batch loss {start:.4f} -> {end:.4f}")
    assert end < 0.97 * start
    assert max_diff(before, jax.device_get(state["params"])) > 0
    np.testing.assert_array_equal(np.asarray(frozen["unet"]["conv_in"]["kernel"]),
                                  np.asarray(t.params["unet"]["conv_in"]["kernel"]))  # fmt: skip


def one_device():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.slow  # three runs, 5-8 min on 2 cores; the loop's resume is test_training.py::test_resume_is_exact and
# the export's loading test_the_export_loads_in_diffusers_with_the_same_residuals, both in the default run
def test_resume_is_exact_and_the_export_loads(tmp_path):
    cfg = small_config(tmp_path)
    whole = loop.run(cfg, tmp_path / "a", log=lambda s: None, mesh=one_device())
    loop.train(cfg, tmp_path / "b", log=lambda s: None, stop_at=2, mesh=one_device())
    resumed = loop.run(cfg, tmp_path / "b", log=lambda s: None, mesh=one_device())
    assert max_diff(jax.device_get(whole.state), jax.device_get(resumed.state)) == 0.0
    config, params = load_controlnet(whole.metrics["controlnet"])  # float16 on disk, as export_dtype says
    assert max_diff(params, whole.state["params"]) < 1e-2
    assert config.unet.cross_attention_dim == 32 and config.conditioning_embedding_out_channels == (8, 16, 16)


@pytest.mark.live
def test_the_export_loads_in_diffusers_with_the_same_residuals(tmp_path):
    import torch
    from diffusers import ControlNetModel as TorchControlNet

    cfg = small_config(tmp_path, **{"export_dtype": "float32", "steps": 2})
    out = loop.run(cfg, tmp_path / "run", log=lambda s: None, mesh=one_device()).metrics["controlnet"]
    config, params = load_controlnet(out)
    theirs = TorchControlNet.from_pretrained(out).eval()
    g = np.random.default_rng(0)
    x, ctx = g.standard_normal((1, 4, 8, 8)).astype(np.float32), g.standard_normal((1, 5, 32)).astype(np.float32)
    hint = g.random((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        down, mid = theirs(torch.from_numpy(x), torch.tensor([500.0]), torch.from_numpy(ctx), torch.from_numpy(hint),
                           return_dict=False)  # fmt: skip
    ours_down, ours_mid = ControlNetModel(config).apply({"params": params}, x.transpose(0, 2, 3, 1), np.array([500.0]),
                                                        ctx, hint.transpose(0, 2, 3, 1))  # fmt: skip
    assert np.abs(np.asarray(ours_mid) - mid.numpy().transpose(0, 2, 3, 1)).max() < 1e-4
    assert max(np.abs(np.asarray(a) - b.numpy().transpose(0, 2, 3, 1)).max() for a, b in zip(ours_down, down)) < 1e-4


@pytest.mark.parametrize(("kw", "words"), [
    ({"data.control": ""}, "needs data.control"),
    ({"data.control": "sobel"}, "data.control='sobel' is not one of"),
    ({"data.control": "silhouette", "data.source": "synthetic"}, "needs data.source='shapes'"),
    ({"train": ("unet",)}, "trains '(\"controlnet\",)' only"),
    ({"init_from": None}, "a controlnet run needs init_from"),
])  # fmt: skip
def test_bad_controlnet_configs_are_refused_before_loading(tmp_path, kw, words):
    with pytest.raises((ConfigError, ValueError), match=words.replace("(", r"\(").replace(")", r"\)")):
        check_config(small_config(tmp_path, **kw))
