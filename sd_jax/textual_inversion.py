"""Textual inversion (Gal et al. 2022): new tokens whose embedding rows are learned, added to a model.

:func:`add_embeddings` is pure over ``(components, params)``: it returns new values with every text encoder's
``token_embedding`` table grown by the new rows, its config's ``vocab_size`` raised to match, and the tokens added
to a copy of each tokenizer. It checks every embedding before building anything, so an error leaves nothing
half-applied. As diffusers' ``TextualInversionLoaderMixin.load_textual_inversion``, a ``[n, width]`` embedding
becomes the tokens ``token, token_1, ..., token_{n-1}``; at tokenize time a prompt's ``token`` is replaced by that
sequence (:func:`sd_jax.tokenizer.expand_multi_vector`).

Reading the files users have (A1111/civitai, SDXL ``clip_l``/``clip_g``, diffusers ``learned_embeds``) is
:mod:`sd_jax.loading.embeddings`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from sd_jax.errors import CheckpointError, ShapeMismatchError

ONLY = "*"  # Embedding.vectors key of a file made for a one-encoder model (SD 1.x / 2.x)


class TokenExistsError(CheckpointError):
    """A textual-inversion token is already in the tokenizer's vocabulary."""


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One embedding file's vectors: ``vectors`` maps a text encoder name (``"text_encoder"``,
    ``"text_encoder_2"``) or :data:`ONLY` to a ``[n_vectors, width]`` float32 array; ``source`` names the file."""

    token: str
    vectors: dict
    source: str = "<memory>"

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def tokens(self) -> list[str]:
        """``token, token_1, ...``: one token per vector, as diffusers names them."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]


def token_table(params: dict, name: str):
    """The ``[vocab, width]`` token embedding table of text encoder ``name``."""
    return params[name]["text_model"]["embeddings"]["token_embedding"]["embedding"]


def with_token_table(params: dict, name: str, table) -> dict:
    """A new params dict with text encoder ``name``'s token table replaced (every other leaf shared)."""
    te = params[name]
    tm = te["text_model"]
    emb = tm["embeddings"]
    new_emb = {**emb, "token_embedding": {**emb["token_embedding"], "embedding": table}}
    return {**params, name: {**te, "text_model": {**tm, "embeddings": new_emb}}}


def _vectors_for(emb: Embedding, names: Sequence[str]) -> dict:
    """Encoder name -> ``[n, width]`` vectors, or a clear error when the file is for another kind of model."""
    keys = set(emb.vectors)
    if keys == {ONLY}:
        if len(names) != 1:
            raise CheckpointError(
                f"{emb.source}: holds one set of vectors (an SD 1.x/2.x embedding), but this model has "
                f"{len(names)} text encoders; an SDXL embedding has clip_l and clip_g"
            )
        return {names[0]: emb.vectors[ONLY]}
    if keys != set(names):
        have = "clip_l/clip_g (SDXL)" if len(keys) == 2 else ", ".join(sorted(keys))
        raise CheckpointError(
            f"{emb.source}: has vectors for {have}, but this model's text encoders are {', '.join(names)}"
        )
    return {n: emb.vectors[n] for n in names}


def check_embeddings(comps, params: dict, embeddings: Sequence[Embedding]) -> list[dict]:
    """Every embedding's vectors per encoder, after checking widths, counts and tokens (nothing is changed)."""
    names = comps.text_names
    seen: dict[str, str] = {}
    out = []
    for emb in embeddings:
        vecs = _vectors_for(emb, names)
        counts = {v.shape[0] for v in vecs.values()}
        if len(counts) != 1:
            raise ShapeMismatchError(
                f"{emb.source}: clip_l and clip_g hold different numbers of vectors "
                f"({', '.join(f'{n}: {v.shape[0]}' for n, v in vecs.items())})"
            )
        for n, v in vecs.items():
            width = token_table(params, n).shape[-1]
            if v.ndim != 2 or v.shape[-1] != width:
                raise ShapeMismatchError(
                    f"{emb.source}: embedding for {n} has shape {tuple(v.shape)}, but {n} is {width} wide "
                    f"(an embedding trained for another base model, e.g. SD 1.x (768) on SD 2.x (1024)?)"
                )
        for tok in emb.tokens():
            if tok in seen:
                raise TokenExistsError(f"{emb.source}: token {tok!r} is also added by {seen[tok]}")
            for tokenizer in comps.tokenizers:
                if tok in tokenizer.get_vocab():
                    raise TokenExistsError(
                        f"{emb.source}: token {tok!r} is already in the tokenizer's vocabulary; "
                        "choose another token (PATH:token)"
                    )
            seen[tok] = emb.source
        if f"{emb.token}_1" in comps.tokenizers[0].get_vocab():
            raise TokenExistsError(
                f"{emb.source}: token {emb.token!r} would collide with the multi-vector token "
                f"{emb.token + '_1'!r} already loaded; choose another token (PATH:token)"
            )
        out.append(vecs)
    return out


def add_embeddings(comps, params: dict, embeddings: Sequence[Embedding]):
    """``(components, params)`` with the embeddings' tokens added (new objects; the inputs are untouched).

    Each tokenizer gets the tokens in order (so they take the next ids, as ``tokenizer.add_tokens`` gives), and
    each encoder's table grows to hold them, its config's ``vocab_size`` with it.
    """
    embeddings = list(embeddings)
    per_emb = check_embeddings(comps, params, embeddings)
    if not embeddings:
        return comps, params
    tokenizers = [copy.deepcopy(t) for t in comps.tokenizers]
    encoders = list(comps.text_encoders)
    for i, name in enumerate(comps.text_names):
        tok = tokenizers[min(i, len(tokenizers) - 1)]
        ids, rows = [], []
        for emb, vecs in zip(embeddings, per_emb):
            for t, row in zip(emb.tokens(), vecs[name]):
                tok.add_tokens(t)  # one at a time, as diffusers does
                ids.append(tok.convert_tokens_to_ids(t))
                rows.append(row)
        table = token_table(params, name)
        size = max(table.shape[0], max(ids) + 1)
        grown = jnp.zeros((size, table.shape[1]), table.dtype).at[: table.shape[0]].set(table)
        grown = grown.at[np.asarray(ids)].set(jnp.asarray(np.stack(rows), table.dtype))
        params = with_token_table(params, name, grown)
        enc = encoders[i]
        encoders[i] = enc.clone(config=dataclasses.replace(enc.config, vocab_size=size))
    return comps.replace(text_encoders=tuple(encoders), tokenizers=tuple(tokenizers)), params


def token_ids(comps, tokens: Sequence[str]) -> list[np.ndarray]:
    """Per text encoder, the ids of ``tokens`` in its tokenizer (``int32 [n]``)."""
    out = []
    for i in range(len(comps.text_encoders)):
        tok = comps.tokenizers[min(i, len(comps.tokenizers) - 1)]
        out.append(np.asarray([tok.convert_tokens_to_ids(t) for t in tokens], np.int32))
    return out
