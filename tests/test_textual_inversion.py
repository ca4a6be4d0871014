"""Textual inversion: embedding files in every layout against diffusers' ``load_textual_inversion``
(references from tools/make_ti_fixtures.py), bad input, and training new token rows on the embedded model."""

import numpy as np
import pytest
from conftest import FIXTURES

from sd_jax import components as C
from sd_jax.errors import CheckpointError, ShapeMismatchError, UnsafeCheckpointError
from sd_jax.loading import embeddings as E
from sd_jax.loading.safetensors_io import write_safetensors
from sd_jax.textual_inversion import TokenExistsError, token_table

EMB = FIXTURES / "embeddings"
REF = FIXTURES / "reference" / "textual_inversion.npz"
SD1_SAFE = [str(EMB / "sd1_emb.safetensors"), str(EMB / "sd1_diffusers"),
            str(EMB / "sd1_multi.safetensors")]  # fmt: skip


@pytest.fixture(scope="module")
def sd1():
    return C.load(FIXTURES / "sd1")


@pytest.fixture(scope="module")
def sdxl():
    return C.load(FIXTURES / "sdxl")


def _encode(comps, params, prompts):
    from sd_jax.pipelines.conditioning import encode

    return {k: np.asarray(v) for k, v in encode(comps, params, list(prompts)).items()}


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_sd1_safetensors_layouts_match_diffusers(sd1):
    ref = np.load(REF)
    comps, params = E.load_embeddings(*sd1, SD1_SAFE)
    prompts = [str(p) for p in ref["sd1_safe/prompts"]]
    np.testing.assert_array_equal(C.tokenize_prompts(comps, prompts)[0], ref["sd1_safe/input_ids"])
    err = _err(_encode(comps, params, prompts)["context"], ref["sd1_safe/context"])
    assert err <= 1e-5, err
    assert comps.text_encoders[0].config.vocab_size == 1114 + 2 + 1 + 3
    assert sd1[0].text_encoders[0].config.vocab_size == 1114  # the input is untouched


@pytest.mark.live
def test_sd1_a1111_pickle_matches_diffusers(sd1):
    ref = np.load(REF)
    specs = [SD1_SAFE[0], str(EMB / "sd1_stp.pt"), *SD1_SAFE[1:]]
    comps, params = E.load_embeddings(*sd1, specs, allow_pickle=True)
    prompts = [str(p) for p in ref["sd1/prompts"]]
    np.testing.assert_array_equal(C.tokenize_prompts(comps, prompts)[0], ref["sd1/input_ids"])
    err = _err(_encode(comps, params, prompts)["context"], ref["sd1/context"])
    assert err <= 1e-5, err


def test_sdxl_clip_l_clip_g_match_diffusers(sdxl):
    ref = np.load(REF)
    comps, params = E.load_embeddings(*sdxl, str(EMB / "sdxl_emb.safetensors"))
    out = _encode(comps, params, [str(p) for p in ref["sdxl/prompts"]])
    assert _err(out["context"], ref["sdxl/context"]) <= 1e-5
    assert _err(out["text_embeds"], ref["sdxl/text_embeds"]) <= 1e-5
    rows = [np.asarray(token_table(params, n))[-2:] for n in comps.text_names]
    clip = E.read_embedding_tree(EMB / "sdxl_emb.safetensors")[1]
    np.testing.assert_array_equal(rows[0], clip["clip_l"])  # clip_l -> text_encoder, clip_g -> text_encoder_2
    np.testing.assert_array_equal(rows[1], clip["clip_g"])


def test_tokens_and_spec():
    assert E.load_embedding(EMB / "sd1_emb.safetensors").tokens() == ["sd1_emb", "sd1_emb_1"]  # the file stem
    assert E.load_embedding(EMB / "sd1_diffusers").tokens() == ["<tiny-cat>"]  # the diffusers key
    assert E.load_embedding(f"{EMB / 'sd1_multi.safetensors'}:<x>").tokens() == ["<x>", "<x>_1", "<x>_2"]
    assert E.parse_embedding_spec(f"{EMB}/sd1_emb.safetensors:tok") == (f"{EMB}/sd1_emb.safetensors", "tok")
    assert E.parse_embedding_spec("no/such:file/x") == ("no/such:file/x", None)


def test_pipeline_load_textual_inversion(sd1):
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.from_components(*sd1)
    tokens = E.load_textual_inversion(pipe, str(EMB / "sd1_multi.safetensors"))
    assert tokens == ["<tri>", "<tri>_1", "<tri>_2"]
    ref = _encode(*E.load_embeddings(*sd1, str(EMB / "sd1_multi.safetensors")), ["a <tri>"])
    cond, _ = pipe.conditioning(["a <tri>"], None, 1.0, 32, 32)
    assert _err(cond["context"], ref["context"]) == 0.0


# -- bad input: one clear error, nothing changed --


def _file(tmp_path, name, tensors):
    path = tmp_path / name
    write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()})
    return str(path)


def test_bad_input_is_refused_and_nothing_changes(sd1, sdxl, tmp_path):
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.from_components(*sd1)
    before_comps, before_table = pipe.components, np.asarray(token_table(pipe.params, "text_encoder"))
    good = str(EMB / "sd1_emb.safetensors")
    cases = [
        (
            _file(tmp_path, "wide.safetensors", {"emb_params": np.ones((1, 48))}),
            ShapeMismatchError,
            r"wide.safetensors: embedding for text_encoder has shape \(1, 48\), but text_encoder is 32 wide",
        ),
        (_file(tmp_path, "a.safetensors", {"a": np.ones(32)}), TokenExistsError, "'a' is already in"),
        (
            _file(tmp_path, "odd.safetensors", {"x": np.ones(32), "y": np.ones(32)}),
            CheckpointError,
            r"odd.safetensors: unknown embedding layout \(keys: x, y\)",
        ),
        (str(EMB / "sdxl_emb.safetensors"), CheckpointError, "clip_l/clip_g"),
        (str(EMB / "sd1_stp.pt"), UnsafeCheckpointError, "sd1_stp.pt: pickle"),
        (str(tmp_path / "missing.safetensors"), CheckpointError, "no such embedding file"),
    ]
    for path, kind, message in cases:
        with pytest.raises(kind, match=message):
            E.load_textual_inversion(pipe, [good, path], ["first", None])  # the good one is never half-applied
    with pytest.raises(TokenExistsError, match="'twice' is also added by"):
        E.load_textual_inversion(pipe, [good, good], ["twice", "twice"])
    with pytest.raises(CheckpointError, match="one set of vectors"):
        E.load_embeddings(*sdxl, good)
    assert pipe.components is before_comps
    np.testing.assert_array_equal(np.asarray(token_table(pipe.params, "text_encoder")), before_table)
    assert "first" not in pipe.components.tokenizers[0].get_vocab()
    E.load_textual_inversion(pipe, good)  # then a good load still works, and a second one is refused
    with pytest.raises(TokenExistsError, match="'sd1_emb' is already in"):
        E.load_textual_inversion(pipe, good)


# -- training the new rows on the embedded model --


def _one_device():
    import jax

    from sd_jax.sharding import make_mesh

    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _denoising_error(obj, frozen, images, prompt, timesteps=(500, 700, 900)):
    """``rows -> `` the U-Net's mean squared error on fixed noise at fixed, noisy timesteps, conditioned on
    ``prompt``: where the text decides the picture (the training loss averages it with low noise levels)."""
    import jax
    import jax.numpy as jnp

    from sd_jax.parametrization import training_target
    from sd_jax.tokenizer import tokenize
    from sd_jax.training.conditioning import text_conditioning

    comps = obj.comps
    n, k = images.shape[0], len(timesteps)
    ids = tokenize(comps.tokenizers[0], [prompt] * (n * k))
    abar = jnp.asarray(comps.schedule.alphas_cumprod())[jnp.repeat(jnp.asarray(timesteps), n)][:, None, None, None]

    @jax.jit
    def err(rows):
        p = obj.merged(rows, frozen)
        x0 = jnp.tile(C.encode_images(comps, p, images), (k, 1, 1, 1))
        noise = jax.random.normal(jax.random.key(0), x0.shape)
        x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise
        ctx = text_conditioning(comps, p, {"input_ids": ids})["context"]
        out = comps.unet.apply({"params": p["unet"]}, x_t, jnp.repeat(jnp.asarray(timesteps), n), ctx)
        return jnp.mean((out - training_target(comps.schedule.prediction_type, x0, noise, abar)) ** 2)

    return lambda rows: float(err(rows))


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A few steps of "<sjx>" on a held-out combination: (trainer, source, start rows, state, losses)."""
    import jax

    from sd_jax.data.shapes import HELD_OUT
    from sd_jax.evaluation.textual_inversion import ConceptSource, config
    from sd_jax.training import loop

    c = config(steps=30, **{"batch_size": 4, "optim.lr": 5e-2})
    t = loop.Trainer(c, mesh=_one_device())
    src = ConceptSource(HELD_OUT[0], t.tokenizers[0], c.textual_inversion.prompt)
    state, frozen = t.init_state(), t.frozen()
    start_rows = jax.device_get(state["params"])
    evaluate = _denoising_error(t.objective, frozen, src.batch(1000, 8)["images"], c.textual_inversion.prompt)
    start = evaluate(state["params"])
    for step in range(c.steps):
        state, _ = t.step(state, frozen, src.batch(step, c.batch_size))
    return t, frozen, start_rows, state, (start, evaluate(state["params"]))


def test_training_lowers_the_loss_and_moves_only_the_new_rows(taught):
    import jax

    t, frozen, start_rows, state, (start, end) = taught
    print(f"denoising error of '<sjx>' at t=500..900: {start:.4f} -> {end:.4f}")
    assert end < 0.9 * start
    obj = t.objective
    assert obj.tokens == ["<sjx>"] and obj.comps.text_encoders[0].config.vocab_size == 49409
    rows = jax.device_get(state["params"])
    assert {k: v.shape for k, v in rows.items()} == {"text_encoder": (1, 128)}  # the state is the row, nothing else
    circle = obj.comps.tokenizers[0].convert_tokens_to_ids("circle</w>")
    table = np.asarray(token_table(obj.params, "text_encoder"))
    np.testing.assert_array_equal(start_rows["text_encoder"][0], table[circle])  # initialized from "circle"
    assert np.abs(rows["text_encoder"] - start_rows["text_encoder"]).max() > 1e-2
    merged = np.asarray(token_table(obj.merged(rows, jax.device_get(frozen)), "text_encoder"))
    np.testing.assert_array_equal(merged[:-1], table[:-1])  # every other row as it was
    np.testing.assert_array_equal(merged[-1], rows["text_encoder"][0])
    base = C.load(obj.comps.path)[1]
    same = jax.tree.map(np.array_equal, jax.device_get(frozen)["unet"], base["unet"])
    assert jax.tree.all(same)


def test_export_loads_back_as_the_trained_rows(taught, tmp_path):
    t, _, _, state, _ = taught
    path = t.objective.export(tmp_path, state, tmp_path)
    assert path.name == "learned_embeds.safetensors"
    emb = E.load_embedding(tmp_path)  # the folder, as diffusers' load_textual_inversion(folder)
    assert emb.tokens() == ["<sjx>"]
    np.testing.assert_array_equal(emb.vectors["*"], np.asarray(state["params"]["text_encoder"]))


@pytest.mark.live
def test_export_loads_in_diffusers(taught, tmp_path):
    import jax
    import torch
    from diffusers import StableDiffusionPipeline

    t, frozen, _, state, _ = taught
    obj = t.objective
    obj.export(tmp_path, state, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(obj.comps.path, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)  # fmt: skip
    pipe.load_textual_inversion(str(tmp_path))  # the folder: diffusers finds learned_embeds.safetensors
    prompts = ["<sjx>", "a <sjx> on a blue background"]
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompts, "cpu", 1, False)[0].numpy()
    ours = _encode(obj.comps, obj.merged(jax.device_get(state["params"]), jax.device_get(frozen)), prompts)
    assert _err(ours["context"], theirs) <= 1e-5


@pytest.mark.slow
def test_token_alone_draws_the_held_out_combination(tmp_path):
    """The full demo (python -m sd_jax.evaluation.textual_inversion): 300 steps, 64 samples of "<sjx>" alone."""
    from sd_jax.evaluation.textual_inversion import teach_and_evaluate

    report = teach_and_evaluate(0, steps=300, samples=64, workdir=tmp_path)
    assert report["token_after"]["joint"] >= 0.5
    assert report["token_after"]["joint"] > report["token_before"]["joint"] + 0.3
