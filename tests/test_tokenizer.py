"""The shipped CLIP vocabulary tokenizes exactly like CLIP; padding follows the checkpoint."""

import json

import numpy as np
import pytest

from sd_jax.tokenizer import load_tokenizer, tokenize

ASTRONAUT = "a photo of an astronaut riding a horse on the moon"
IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 518, 3293, 49407]


def test_shipped_vocab_gives_clip_ids_and_pads_with_eos():
    ids = tokenize(load_tokenizer(), ASTRONAUT)
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :13].tolist() == IDS
    assert set(ids[0, 13:].tolist()) == {49407}


def test_sd2_config_pads_with_bang(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!", "model_max_length": 77}))
    ids = tokenize(load_tokenizer(tmp_path), [ASTRONAUT, "a cat"])
    assert ids[0, :13].tolist() == IDS and set(ids[0, 13:].tolist()) == {0}
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407] and ids[1, 4] == 0


def test_checkpoint_folder_wins(fixtures_dir):
    tok = load_tokenizer(fixtures_dir / "sd1" / "tokenizer")  # 600-merge vocabulary
    ids = tokenize(tok, ASTRONAUT)
    assert tok.vocab_size == 1114 and ids[0, 0] == 1112
    assert ids.max() <= 1113 and ids[0].tolist() != IDS + [49407] * 64


def test_overlong_prompt_warns_with_dropped_count():
    with pytest.warns(UserWarning, match=r"3 token\(s\) dropped"):
        ids = tokenize(load_tokenizer(), " ".join(["cat"] * 78))  # 78 words + BOS + EOS = 80
    assert ids.shape == (1, 77) and ids[0, -1] == 49407
