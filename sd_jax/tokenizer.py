"""CLIP tokenization, offline, as diffusers' pipelines tokenize prompts.

The real CLIP BPE vocabulary ships in ``sd_jax/tokenizer_files`` (built by
``tools/build_vocab.py`` from the ``open_clip_torch`` wheel). A checkpoint's
own ``tokenizer/`` folder wins over it. Its special tokens decide the padding:
``<|endoftext|>`` = 49407 for SD 1.x, ``!`` = 0 for SD 2.x and SDXL's second
encoder. As in transformers, ``special_tokens_map.json`` overrides
``tokenizer_config.json`` (real SD 2.x folders say ``<|endoftext|>`` in the
latter and ``!`` in the former, and pad with 0).
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np

SHIPPED = pathlib.Path(__file__).resolve().parent / "tokenizer_files"
MAX_LENGTH = 77
_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token(value) -> str:
    return value.get("content") if isinstance(value, dict) else value  # AddedToken serialization


def _has_vocab(folder: pathlib.Path) -> bool:
    return (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists()


def load_tokenizer(folder: os.PathLike | str | None = None, pad_token: str | None = None):
    """A transformers ``CLIPTokenizer`` (matches diffusers' ``CLIPTokenizer.from_pretrained``).

    - ``folder`` with a vocabulary (``vocab.json``+``merges.txt`` or ``tokenizer.json``):
      loaded as transformers loads it, so its special tokens and length apply.
    - ``folder`` with only ``tokenizer_config.json``/``special_tokens_map.json`` (our
      shipped full-size configs): their special tokens over the shipped vocabulary.
    - no folder: the shipped vocabulary, padding with ``<|endoftext|>`` (SD 1.x).

    ``pad_token`` overrides the padding token in every case.
    """
    # transformers is here only for its tokenizers: its "PyTorch was not found" advice at import is noise to us.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import CLIPTokenizer

    folder = pathlib.Path(folder) if folder is not None else None
    overrides = {"pad_token": pad_token} if pad_token else {}
    if folder is not None and _has_vocab(folder):
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **overrides)
    config: dict = {}
    if folder is not None:
        config = _read_json(folder / "tokenizer_config.json")
        config.update(_read_json(folder / "special_tokens_map.json"))  # transformers' precedence
    specials = {k: _token(config.get(k)) or default for k, default in _SPECIALS.items()}
    return CLIPTokenizer.from_pretrained(
        str(SHIPPED),
        model_max_length=config.get("model_max_length", MAX_LENGTH),
        local_files_only=True,
        **{**specials, **overrides},
    )


def max_length_of(tokenizer) -> int:
    """The tokenizer's ``model_max_length`` (diffusers pads prompts to it); 77 where a folder without
    ``tokenizer_config.json`` leaves transformers' "unlimited" placeholder."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n <= 4096 else MAX_LENGTH


def fit_to_encoder(tokenizer, positions: int):
    """Sets the tokenizer's length to its own (:func:`max_length_of`) but never past its text encoder's
    ``positions``, so a from-scratch or config-less tokenizer fills exactly the encoder's positions."""
    tokenizer.model_max_length = min(max_length_of(tokenizer), positions)
    return tokenizer


def tokenize(tokenizer, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
    """``int32 [B, max_length]`` ids: BOS, tokens, EOS, then the tokenizer's padding.

    ``max_length`` defaults to the tokenizer's own length (:func:`max_length_of`): 77 for every SD checkpoint,
    16 for the embedded model, whose text encoder has 16 positions.

    Multi-vector textual-inversion tokens are spelt out first (:func:`expand_multi_vector`).

    Over-long prompts keep their first ``max_length - 2`` tokens and their EOS (as
    diffusers' ``truncation=True``), with a warning naming the prompt and the count.
    """
    max_length = max_length or max_length_of(tokenizer)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = expand_multi_vector(tokenizer, prompts)
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    for i, (prompt, ids) in enumerate(zip(prompts, full)):
        if len(ids) > max_length:
            short = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            warnings.warn(
                f"prompt {i} is {len(ids)} tokens long; truncated to {max_length}: "
                f"{len(ids) - max_length} token(s) dropped from {short!r}",
                stacklevel=2,
            )
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int32)


def tokenize_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids without BOS/EOS, never truncated (A1111's ``tokenize``), multi-vector
    textual-inversion tokens spelt out (:func:`expand_multi_vector`). Long prompts chunk these
    (:mod:`sd_jax.pipelines.long_prompts`), so nothing warns about length here."""
    if not texts:
        return []
    texts = expand_multi_vector(tokenizer, list(texts))
    return [
        list(ids) for ids in tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    ]


def vector_groups(tokenizer) -> dict[int, list[int]]:
    """``{first id: [its ids]}`` of every multi-vector textual-inversion token (``t, t_1, ...``): the vectors a
    chunk boundary must not split (A1111 moves a whole embedding into the next chunk)."""
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    return {added[t]: [added[t]] + [added[s] for s in _suffixed(added, t)] for t in added if f"{t}_1" in added}


def expand_multi_vector(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt with a multi-vector textual-inversion token ``t`` spelt out as ``t t_1 t_2 ...`` (diffusers'
    ``TextualInversionLoaderMixin.maybe_convert_prompt``); prompts without one are returned unchanged."""
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    multi = [t for t in added if f"{t}_1" in added]
    out = []
    for prompt in prompts:
        if any(t in prompt for t in multi):
            for t in set(tokenizer.tokenize(prompt)) & set(multi):
                prompt = prompt.replace(t, " ".join([t] + _suffixed(added, t)))
        out.append(prompt)
    return out


def _suffixed(added: dict, token: str) -> list[str]:
    names, i = [], 1
    while f"{token}_{i}" in added:
        names.append(f"{token}_{i}")
        i += 1
    return names


def repad(ids: np.ndarray, eos_id: int, pad_id: int) -> np.ndarray:
    """``ids`` as a tokenizer with the same vocabulary but another padding token gives them: every position after
    the first EOS becomes ``pad_id``. SDXL's two tokenizers differ only so (``<|endoftext|>`` vs ``!`` padding)."""
    ids = np.asarray(ids)
    is_eos = ids == eos_id
    after_first_eos = np.cumsum(is_eos, axis=-1) - is_eos > 0
    return np.where(after_first_eos, pad_id, ids).astype(np.int32)
