"""The embedded default model: shipped weights, sample.py's default, prompt adherence; its configs as smoke runs."""

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from sd_jax.embedded import default_model_path

MODEL = default_model_path()
needs_model = pytest.mark.skipif(MODEL is None, reason="the embedded model is not in this checkout")


@needs_model
def test_shipped_weights_are_small_and_load_like_any_checkpoint():
    from sd_jax.loading.diffusers import load_checkpoint

    total = sum(p.stat().st_size for p in pathlib.Path(MODEL).rglob("*") if p.is_file())
    assert total <= 40 * 2**20, total
    ckpt = load_checkpoint(MODEL)
    assert {"unet", "vae", "text_encoder"} <= set(ckpt.models)
    assert ckpt.config("vae").downsample_factor == 4 and ckpt.config("vae").latent_channels == 4


@needs_model
def test_sample_py_defaults_to_it_and_follows_prompts(tmp_path):
    from sd_jax.cli.sample import main
    from sd_jax.data import shapes
    from sd_jax.evaluation.oracle import classify

    combos = [("circle", "red", "blue"), ("square", "yellow", "purple"), ("triangle", "white", "black"),
              ("circle", "green", "orange")]  # fmt: skip
    args = ["--output-dir", str(tmp_path), "--seed", "0", "--steps", "20"]
    for c in combos:
        args += ["--prompt", shapes.caption(*c)]
    main(args)
    pngs = sorted(p for p in tmp_path.glob("*.png") if "grid" not in p.name)
    assert len(pngs) == len(combos)
    got = [tuple(int(x) for x in classify(np.asarray(Image.open(p).convert("RGB")))) for p in pngs]
    want = [(shapes.SHAPES.index(s), shapes.COLORS.index(c), shapes.COLORS.index(b)) for s, c, b in combos]
    # The shipped model (README: 98.6% / 100% joint on seen / held-out, colours 100%) gets all 4 fully right
    # here; the joint bound leaves one image of margin (a shape) for numerics on other machines.
    assert sum(g == w for g, w in zip(got, want)) >= 3, (got, want)
    assert all(g[1:] == w[1:] for g, w in zip(got, want)), (got, want)


@pytest.mark.slow  # the shipped configs end to end (3-7 min each on 2 cores); the tiny configs run in CI
@pytest.mark.parametrize("name", ["shapes_vae", "shapes_vae_decoder", "shapes_unet"])
def test_embedded_model_configs_run_a_few_steps(tmp_path, name, monkeypatch):
    import importlib

    from sd_jax.training import loop
    from sd_jax.training.model import build

    cfg = importlib.import_module(f"configs.{name}").get_config("runlocal")
    cfg.data.data_dir = str(tmp_path / "tfds")
    r = loop.run(cfg, tmp_path / "run", log=lambda *_: None)
    m = r.metrics
    assert m["step"] == cfg.steps and np.isfinite(m["loss"])
    if cfg.optim.freeze:  # the decoder fine-tune: the encoder (so the U-Net's latents) must not move
        init = build(cfg)[1]["vae"]
        got = jax.device_get(r.state["params"]["vae"])
        for name in ("encoder", "quant_conv"):
            assert jax.tree.all(jax.tree.map(np.array_equal, got[name], jax.device_get(init[name]))), name
        assert not np.array_equal(got["decoder"]["conv_out"]["kernel"], init["decoder"]["conv_out"]["kernel"])
    if "text_encoder" in cfg.train:  # 16 text positions: trained on 16-token ids, exported with that length
        import json

        from sd_jax.components import tokenize_prompts
        from sd_jax.pipelines.pipeline import StableDiffusion

        loop.export(cfg, tmp_path / "run", tmp_path / "export")
        tok_cfg = json.loads((tmp_path / "export" / "tokenizer" / "tokenizer_config.json").read_text())
        assert tok_cfg["model_max_length"] == cfg.model.text.max_position_embeddings == 16
        pipe = StableDiffusion.load(tmp_path / "export")
        assert tokenize_prompts(pipe.components, ["a red circle on a blue background"])[0].shape == (1, 16)


def test_optim_freeze_names_unknown_prefixes():
    from sd_jax.training.optim import freeze_labels

    params = {"vae": {"encoder": {"w": np.zeros(2)}, "decoder": {"w": np.zeros(2)}}}
    assert freeze_labels(params, ("vae/encoder",)) == {"vae": {"encoder": {"w": "freeze"}, "decoder": {"w": "train"}}}
    with pytest.raises(ValueError, match=r"vae/encodr.*match no parameter"):
        freeze_labels(params, ("vae/encodr",))


def test_evaluation_shows_progress(capsys):
    """The evaluation's image generation shows a bar per seed (it was silent for minutes)."""
    from sd_jax.evaluation.shapes_eval import generate
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.load(default_model_path())
    imgs = generate(pipe, [("circle", "red", "blue"), ("square", "green", "white")], 7, steps=2, batch=1)
    assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.uint8
    err = capsys.readouterr().err
    assert "euler 2 steps, seed 7" in err and "2/2" in err
