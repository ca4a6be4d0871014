"""The shipped CLIP vocabulary tokenizes exactly like CLIP; padding and vocabulary follow the checkpoint."""

import json
import os

import numpy as np
import pytest

from sd_jax.tokenizer import SHIPPED, load_tokenizer, tokenize

ASTRONAUT = "a photo of an astronaut riding a horse on the moon"
IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 518, 3293, 49407]


def test_shipped_vocab_gives_clip_ids_and_pads_with_eos():
    ids = tokenize(load_tokenizer(), ASTRONAUT)
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :13].tolist() == IDS
    assert set(ids[0, 13:].tolist()) == {49407}


def test_config_only_folder_pads_with_bang(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!", "model_max_length": 77}))
    ids = tokenize(load_tokenizer(tmp_path), [ASTRONAUT, "a cat"])
    assert ids[0, :13].tolist() == IDS and set(ids[0, 13:].tolist()) == {0}
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407] and set(ids[1, 4:].tolist()) == {0}


def test_special_tokens_map_overrides_tokenizer_config(tmp_path):
    # The layout of real SD 2.x tokenizer folders; transformers (hence diffusers) pads with "!" = 0.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    assert tokenize(load_tokenizer(tmp_path), "a cat")[0, 4:].tolist() == [0] * 73


def _tiny_vocab_folder(path, pad):
    """A 15-token BPE vocabulary: enough letters for "cat dog a", two merged words, "!" and the specials."""
    vocab = ["!", "a", "c", "d", "g", "o", "t", "a</w>", "g</w>", "t</w>", "ca", "cat</w>", "do", "dog</w>"]
    vocab = {t: i for i, t in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (path / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": pad}))
    (path / "tokenizer_config.json").write_text(json.dumps({**specials, "pad_token": pad, "model_max_length": 8}))
    return vocab


def test_checkpoint_vocab_wins_over_shipped(tmp_path):
    vocab = _tiny_vocab_folder(tmp_path / "tokenizer", pad="!")
    tok = load_tokenizer(tmp_path / "tokenizer")
    ids = tokenize(tok, ["cat dog", "a"], max_length=8)
    bos, eos, bang = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["!"]
    assert tok.vocab_size == len(vocab) == 16
    assert ids[0].tolist() == [bos, vocab["cat</w>"], vocab["dog</w>"], eos] + [bang] * 4
    assert ids[1].tolist() == [bos, vocab["a</w>"], eos] + [bang] * 5


def test_fixture_tokenizer_folder_wins(fixtures_dir):
    tok = load_tokenizer(fixtures_dir / "sd1" / "tokenizer")  # 600-merge vocabulary
    ids = tokenize(tok, ASTRONAUT)
    assert tok.vocab_size == 1114 and ids[0, 0] == 1112
    assert ids.max() <= 1113 and ids[0, :13].tolist() != IDS


def test_overlong_prompt_warns_with_dropped_count():
    with pytest.warns(UserWarning, match=r"prompt 1 is 80 tokens long.*: 3 token\(s\) dropped from 'cat cat"):
        ids = tokenize(load_tokenizer(), ["a cat", " ".join(["cat"] * 78)])  # 78 words + BOS + EOS = 80
    assert ids.shape == (2, 77) and ids[1, -1] == 49407 and ids[1, 0] == 49406
    assert ids[1, 1:-1].tolist() == [2368] * 75


def test_default_length_is_the_tokenizers_own(tmp_path):
    # diffusers pads to tokenizer.model_max_length: 77 for SD checkpoints, 16 for the embedded model
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    ids = tokenize(load_tokenizer(tmp_path), ASTRONAUT)
    assert ids.shape == (1, 16) and ids[0, :13].tolist() == IDS and set(ids[0, 13:].tolist()) == {49407}
    assert tokenize(load_tokenizer(), ASTRONAUT).shape == (1, 77)
    # a vocabulary folder with no tokenizer_config.json states no length (transformers: ~1e30): 77
    vocab = tmp_path / "vocab_only"
    vocab.mkdir()
    for f in ("vocab.json", "merges.txt"):
        (vocab / f).write_bytes((SHIPPED / f).read_bytes())
    assert tokenize(load_tokenizer(vocab), "a cat").shape == (1, 77)


_NO_TORCH = (
    "import importlib.util as u\n"
    "_real = u.find_spec\n"
    "u.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' else _real(n, *a, **k)\n"
)


def test_no_pytorch_advice_when_torch_is_absent():
    """transformers prints "PyTorch was not found" at import when torch is missing (a plain runtime install);
    we import it only for tokenizers, so loading one must stay silent."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    run = lambda code: subprocess.run([sys.executable, "-c", _NO_TORCH + code], capture_output=True, text=True,  # noqa: E731
                                      env=env, timeout=300)  # fmt: skip
    plain = run("import transformers")
    assert "PyTorch was not found" in plain.stderr  # the harness hides torch as a user without it sees it
    ours = run("from sd_jax.tokenizer import load_tokenizer\nprint(len(load_tokenizer(None)('a cat').input_ids))")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == "4"
    assert "PyTorch was not found" not in ours.stderr
