"""CLIP tokenization, offline.

The real CLIP BPE vocabulary ships in ``sd_jax/tokenizer_files`` (built by
``tools/build_vocab.py`` from the ``open_clip_torch`` wheel). A checkpoint's
own ``tokenizer/`` folder wins over it; its ``tokenizer_config.json`` decides
the padding token (``<|endoftext|>`` = 49407 for SD 1.x, ``!`` = 0 for SD 2.x
and SDXL's second encoder).
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np

SHIPPED = pathlib.Path(__file__).resolve().parent / "tokenizer_files"
MAX_LENGTH = 77


def load_tokenizer(folder: os.PathLike | str | None = None, pad_token: str | None = None):
    """A transformers ``CLIPTokenizer`` from ``folder`` (vocab + config), else from the shipped vocabulary.

    A folder with only ``tokenizer_config.json`` (as our shipped full-size configs)
    takes its padding from there and the vocabulary from the package.
    """
    from transformers import CLIPTokenizer

    folder = pathlib.Path(folder) if folder is not None else None
    config = {}
    if folder is not None and (folder / "tokenizer_config.json").exists():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    if folder is not None and (folder / "vocab.json").exists():
        vocab_dir = folder
    else:
        vocab_dir = SHIPPED
    pad = pad_token or config.get("pad_token") or "<|endoftext|>"
    if isinstance(pad, dict):  # AddedToken serialization
        pad = pad.get("content", "<|endoftext|>")
    return CLIPTokenizer.from_pretrained(
        str(vocab_dir),
        pad_token=pad,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=config.get("model_max_length", MAX_LENGTH),
        local_files_only=True,
    )


def tokenize(tokenizer, prompts: str | list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """``int32 [B, max_length]`` ids: BOS, tokens, EOS, then padding; over-long prompts are truncated with a warning."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    full = tokenizer(prompts, padding=False, truncation=False)["input_ids"]
    for prompt, ids in zip(prompts, full):
        if len(ids) > max_length:
            dropped = len(ids) - max_length
            warnings.warn(
                f"prompt truncated to {max_length} tokens: {dropped} token(s) dropped from {prompt[:60]!r}",
                stacklevel=2,
            )
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int32)
