"""Long prompts (A1111's 75-token chunks) and weighting (a1111 / comfy / none) on the tiny SD 1.x, SD 2.x and SDXL
fixtures: each chunk against the plain path, short prompts bit-identical, numpy references of both emphases."""

import functools

import numpy as np
import pytest
from conftest import FIXTURES

from sd_jax import components as C
from sd_jax.pipelines import conditioning as cond
from sd_jax.pipelines import long_prompts as LP
from sd_jax.pipelines.pipeline import StableDiffusion

WORDS = (
    "game man view love will king her other with now great from back life more red live like".split()
)  # one token each in the fixtures' vocabulary


def words(n: int, comma_every: int = 0) -> str:
    out = []
    for i in range(n):
        out.append(WORDS[i % len(WORDS)])
        if comma_every and (i + 1) % comma_every == 0:
            out[-1] += ","
    return " ".join(out)


load = functools.cache(lambda name: C.load(FIXTURES / name))
model = pytest.fixture(scope="module", params=["sd1", "sd2"], name="model")(lambda request: load(request.param))
sd1 = pytest.fixture(scope="module", name="sd1")(lambda: load("sd1"))
sdxl = pytest.fixture(scope="module", name="sdxl")(lambda: load("sdxl"))


def plain(comps, params, ids, clip_skip=None):
    """The plain path: one [B, 77] ids array per encoder through the jitted encode_prompt."""
    tp = {n: params[n] for n in comps.text_names}
    return {k: np.asarray(v) for k, v in LP.encode_ids(comps, tp, tuple(ids), clip_skip).items()}


def body(tok, text):
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def test_short_prompts_are_bit_identical_to_the_plain_path(model, sdxl):
    for comps, params in (model, sdxl):
        prompts = ["a photo of a cat", "", "red cat, blue dog", "(a photo:1.0) of a cat", words(75)]
        ids = C.tokenize_prompts(comps, [p.replace("(a photo:1.0)", "a photo") for p in prompts])
        ref = plain(comps, params, ids)
        ours = cond.encode(comps, params, prompts)
        assert ours.keys() == ref.keys()
        for k in ref:
            assert np.array_equal(np.asarray(ours[k]), ref[k]), k


def test_long_prompt_chunk_by_chunk_equals_the_plain_path(model):
    comps, params = model
    tok = comps.tokenizers[0]
    prompt = words(150)
    full = body(tok, prompt)
    assert len(full) == 150
    (ch,) = LP.tokenize_chunks(comps, [prompt])
    assert ch.ids.shape == (1, 2, 77) and ch.tokens == (150,)
    for clip_skip in (None, 1):
        out = np.asarray(cond.encode(comps, params, [prompt], clip_skip)["context"])
        assert out.shape == (1, 154, 32)
        for k in range(2):
            row = ch.ids[0, k]
            assert row[0] == tok.bos_token_id and row[76] in (tok.eos_token_id, tok.pad_token_id)
            assert list(row[1:76]) == full[75 * k : 75 * (k + 1)]  # no comma: cut at exactly 75
            alone = plain(comps, params, [row[None]], clip_skip)["context"]  # a [1, 77] compile of its own
            err = np.abs(out[:, 77 * k : 77 * (k + 1)] - alone).max()
            assert err <= 2e-6, err  # float32 rounding of another batch size's kernels; same batch: exact
        batched = plain(comps, params, [ch.ids.reshape(2, 77)], clip_skip)["context"]
        np.testing.assert_array_equal(out[0], batched.reshape(154, 32))


def test_sd2_pads_after_the_first_eos_with_its_own_token(fixtures_dir):
    comps, _ = C.load(fixtures_dir / "sd2")
    tok = comps.tokenizers[0]
    (ch,) = LP.tokenize_chunks(comps, [words(80)])
    last = ch.ids[0, 1]
    assert list(last[1:6]) == body(tok, words(80))[75:] and last[6] == tok.eos_token_id
    assert tok.pad_token_id == 0 and (last[7:] == 0).all()


def test_comma_backtrack_and_break(sd1):
    comps, _ = sd1
    tok = comps.tokenizers[0]
    comma = tok.get_vocab()[",</w>"]
    # a comma after token 69: the chunk would be full at 75, so tokens 70.. move to the next chunk (A1111's backtrack)
    prompt = words(69) + ", " + words(20)
    toks = body(tok, prompt)
    assert toks[69] == comma
    ids, ws, total = LP.chunk_prompt(tok, prompt)
    assert total == 90 and len(ids) == 2
    assert ids[0][1:71] == toks[:70] and ids[0][71:] == [tok.eos_token_id] * 6
    assert ids[1][1:21] == toks[70:]
    # a comma 25 tokens back is too far: cut at 75
    prompt = words(50) + ", " + words(40)
    ids, _, _ = LP.chunk_prompt(tok, prompt)
    assert ids[0][1:76] == body(tok, prompt)[:75]
    # BREAK ends the chunk; the weight list stays aligned
    ids, ws, _ = LP.chunk_prompt(tok, "red man BREAK (great king:1.5)")
    assert len(ids) == 2 and ids[0][1:4] == body(tok, "red man") + [tok.eos_token_id]
    assert ids[1][1:3] == body(tok, "great king") and ws[1][1:3] == [1.5, 1.5] and ws[1][3] == 1.0


def _weighted(comps):
    tok = comps.tokenizers[0]
    prompt = words(70) + " (" + words(10) + ":1.5) [" + words(5) + "]"
    ids, ws, _ = LP.chunk_prompt(tok, prompt)
    assert len(ids) == 2
    flat = np.concatenate([np.asarray(w) for w in ws])
    assert (flat[1:71] == 1).all() and np.allclose(flat[71:76], 1.5) and np.allclose(flat[77 + 1 : 77 + 6], 1.5)
    assert np.allclose(flat[77 + 6 : 77 + 11], 1 / 1.1)
    return prompt, [np.asarray(i) for i in ids], [np.asarray(w, np.float32) for w in ws]


def test_a1111_and_comfy_emphasis_match_numpy_references(model):
    comps, params = model
    prompt, ids, ws = _weighted(comps)
    empty = plain(comps, params, [np.asarray([LP.empty_chunk(comps.tokenizers[0])])])["context"][0]
    for emphasis in ("a1111", "comfy", "none"):
        out = np.asarray(cond.encode(comps, params, [prompt], emphasis=emphasis)["context"])[0]
        zs = plain(comps, params, [np.stack(ids)])["context"].astype(np.float64)  # the unweighted chunks, same batch
        for k in range(2):
            z = zs[k]
            w = ws[k][:, None].astype(np.float64)
            if emphasis == "a1111":
                ref = z * w
                ref = ref * (z.mean() / ref.mean())
            elif emphasis == "comfy":
                ref = np.where(w != 1, empty + (z - empty) * w, z)
            else:
                ref = z
            err = np.abs(out[77 * k : 77 * (k + 1)] - ref).max()
            rel = err / np.abs(ref).max()  # float32 sums of the chunk's mean against float64's
            print(f"{emphasis} chunk {k}: max |ours - numpy float64| = {err:.2e}, {rel:.1e} of max |z|")
            assert rel <= 2e-6, (emphasis, k, err)
            assert emphasis == "none" or np.abs(ref - z).max() > 1e-2  # the weights did change it


def test_sdxl_two_encoders_pooled_from_the_first_chunk(sdxl):
    comps, params = sdxl
    prompt = words(70) + " (" + words(30) + ":1.3)"
    chunks = LP.tokenize_chunks(comps, [prompt])
    assert [c.ids.shape for c in chunks] == [(1, 2, 77)] * 2
    assert chunks[1].ids[0, 1, -1] == 0 and chunks[0].ids[0, 1, -1] != 0  # tokenizer_2 pads with "!"
    out = {k: np.asarray(v) for k, v in cond.encode(comps, params, [prompt]).items()}
    widths = [m.config.hidden_size for m in comps.text_encoders]
    assert out["context"].shape == (1, 154, sum(widths))
    both = plain(comps, params, [c.ids.reshape(2, 77) for c in chunks])  # the unweighted chunks, same batch
    refs = [{key: v[k : k + 1] for key, v in both.items()} for k in range(2)]
    np.testing.assert_array_equal(out["text_embeds"], refs[0]["text_embeds"])
    assert np.abs(refs[0]["text_embeds"] - refs[1]["text_embeds"]).max() > 1e-3
    for k in range(2):
        z = refs[k]["context"][0].astype(np.float64)
        w = chunks[0].weights[0, k][:, None].astype(np.float64)
        parts, lo = [], 0
        for width in widths:  # each encoder restores its own mean
            part = z[:, lo : lo + width]
            parts.append(part * w * (part.mean() / (part * w).mean()))
            lo += width
        ref = np.concatenate(parts, -1)
        err = np.abs(out["context"][0, 77 * k : 77 * (k + 1)] - ref).max()
        print(f"sdxl a1111 chunk {k}: max |ours - numpy float64| = {err:.2e}, {err / np.abs(ref).max():.1e} of max |z|")
        assert err / np.abs(ref).max() <= 2e-6, err
    c, u = cond.text_conditioning(comps, params, [prompt], None, 7.5, 32, 32)  # force_zeros_for_empty_prompt
    assert u["context"].shape == c["context"].shape == (1, 154, sum(widths)) and not np.asarray(u["context"]).any()
    assert u["text_embeds"].shape == c["text_embeds"].shape and c["time_ids"].shape == (1, 6)


def test_negative_and_batch_are_padded_to_one_chunk_count(sd1):
    comps, params = sd1
    tok = comps.tokenizers[0]

    def chunk_rows(*rows):  # the plain path on these [77] id rows as one batch (the shape ours encodes)
        return plain(comps, params, [np.stack(rows)])["context"]

    empty = np.asarray(LP.empty_chunk(tok), np.int32)
    blurry = C.tokenize_prompts(comps, ["blurry"])[0][0]
    long = words(100)
    c, u = cond.text_conditioning(comps, params, [long], ["blurry"], 7.5, 32, 32)
    assert c["context"].shape == u["context"].shape == (1, 154, 32)
    np.testing.assert_array_equal(np.asarray(u["context"])[0], chunk_rows(blurry, empty).reshape(154, 32))
    c, u = cond.text_conditioning(comps, params, ["a cat"], [long], 7.5, 32, 32)
    assert c["context"].shape == u["context"].shape == (1, 154, 32)
    short = C.tokenize_prompts(comps, ["a cat"])[0][0]
    np.testing.assert_array_equal(np.asarray(c["context"])[0], chunk_rows(short, empty).reshape(154, 32))
    out = np.asarray(cond.encode(comps, params, ["a cat", words(200)])["context"])
    assert out.shape == (2, 231, 32)
    (ch,) = LP.tokenize_chunks(comps, ["a cat", words(200)])
    assert (ch.ids[0, 1:] == empty).all() and (ch.weights[0, 1:] == 1).all()
    np.testing.assert_array_equal(out, chunk_rows(*ch.ids.reshape(6, 77)).reshape(2, 231, 32))


def test_textual_inversion_vectors_stay_in_one_chunk(sd1):
    pipe = StableDiffusion.from_components(*sd1)
    assert pipe.load_textual_inversion(str(FIXTURES / "embeddings" / "sd1_multi.safetensors")) == [
        "<tri>", "<tri>_1", "<tri>_2"]  # fmt: skip
    comps, params = pipe.components, pipe.params
    tok = comps.tokenizers[0]
    tri = [tok.convert_tokens_to_ids(t) for t in ("<tri>", "<tri>_1", "<tri>_2")]
    prompt = words(74) + " <tri> " + words(10)  # its 3 vectors would straddle 75: all move to chunk 2
    (ch,) = LP.tokenize_chunks(comps, [prompt])
    assert ch.ids.shape == (1, 2, 77) and ch.tokens == (87,)
    assert list(ch.ids[0, 0, 75:]) == [tok.eos_token_id] * 2 and list(ch.ids[0, 1, 1:4]) == tri
    out = np.asarray(cond.encode(comps, params, [prompt])["context"])[0]
    ref = plain(comps, params, [ch.ids.reshape(2, 77)])["context"]
    np.testing.assert_array_equal(out, ref.reshape(154, 32))
    vectors = np.asarray(params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])[tri]
    assert np.abs(vectors).max() > 0  # the loaded rows are what chunk 2 holds
    cond_, _ = pipe.conditioning([prompt], None, 1.0, 32, 32)
    np.testing.assert_array_equal(np.asarray(cond_["context"])[0], out)


def test_pipe_emphasis_and_cap(sd1):
    pipe = StableDiffusion.from_components(*sd1)
    prompt = "a (red:1.4) cat"
    a = np.asarray(pipe.conditioning([prompt], None, 1.0, 32, 32)[0]["context"])
    pipe.emphasis = "comfy"
    b = np.asarray(pipe.conditioning([prompt], None, 1.0, 32, 32)[0]["context"])
    assert np.abs(a - b).max() > 1e-3
    pipe.max_prompt_chunks = 2
    with pytest.raises(LP.PromptTooLongError) as e:
        pipe.conditioning(["x", words(160)], None, 1.0, 32, 32)
    msg = str(e.value)
    assert msg.startswith("prompt 1 is 160 tokens long, 3 chunks of 75; at most 2 chunks (150 tokens)")
    assert "--max-prompt-chunks" in msg and "\n" not in msg
    pipe.emphasis = "bold"
    with pytest.raises(ValueError, match="emphasis 'bold' is not one of a1111, comfy, none"):
        pipe.conditioning([prompt], None, 1.0, 32, 32)


LONG = ("a (red:1.3) circle on a blue background, " + ", ".join(["a small green square in the corner"] * 12)
        + ", [soft light]")  # fmt: skip


def test_cli_long_weighted_prompt_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    from sd_jax.cli.sample import main

    seen = []
    real = StableDiffusion.conditioning

    def spy(self, prompts, *a, **kw):
        seen.append((self.emphasis, self.max_prompt_chunks))
        out = real(self, prompts, *a, **kw)
        seen.append(out[0]["context"].shape)
        return out

    monkeypatch.setattr(StableDiffusion, "conditioning", spy)
    main(["--prompt", LONG, "--steps", "2", "--width", "32", "--height", "32", "--emphasis", "comfy",
          "--max-prompt-chunks", "16", "--output-dir", str(tmp_path)])  # fmt: skip
    assert seen[0] == ("comfy", 16)
    assert seen[1] == (1, 13 * 16, 128)  # 106 tokens in 13 chunks of the embedded model's 14 (+ BOS/EOS)
    assert len(list(tmp_path.glob("*.png"))) == 1
    err = capsys.readouterr().err
    assert "truncat" not in err and "longer than the specified maximum" not in err
    with pytest.raises(SystemExit) as e:
        main(["--prompt", LONG, "--steps", "2", "--width", "32", "--height", "32", "--output-dir", str(tmp_path / "b")])
    assert e.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: prompt 0 is 106 tokens long, 13 chunks of 14; at most 8 chunks"), line
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.png"))
