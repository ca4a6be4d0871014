"""Textual inversion (Gal et al. 2022): only a new token's embedding rows learn the diffusion loss.

The objective adds ``textual_inversion.token`` (``num_vectors`` tokens, named as diffusers names multi-vector
tokens) to every tokenizer and text encoder (:func:`sd_jax.textual_inversion.add_embeddings`), each new row a copy
of ``initializer_token``'s, as diffusers' ``examples/textual_inversion``. The state's ``params`` are those rows
only, ``{encoder: [num_vectors, width]}``; the whole model, the rest of each table included, is one frozen
argument, and the loss scatters the rows into the tables (frozen by construction, no gradient mask). With
``textual_inversion.prompt`` every image trains on that prompt instead of its caption. The run writes
``WORKDIR/learned_embeds.safetensors`` (``{token: [n, width]}``; SDXL ``clip_l`` / ``clip_g``), which
:mod:`sd_jax.loading.embeddings` and diffusers' ``load_textual_inversion`` read.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sd_jax import textual_inversion as ti
from sd_jax.training.trainers.base import Objective
from sd_jax.training.trainers.diffusion import diffusion_loss

EMBEDS_FILE = "learned_embeds.safetensors"  # what diffusers' load_textual_inversion(folder) looks for
SDXL_KEYS = ("clip_l", "clip_g")


def initializer_row(comps, params, name: str, word: str) -> np.ndarray:
    """Text encoder ``name``'s row of ``word``, which must be one token (diffusers' example refuses others)."""
    i = comps.text_names.index(name)
    tok = comps.tokenizers[min(i, len(comps.tokenizers) - 1)]
    ids = tok.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"textual_inversion.initializer_token={word!r} is {len(ids)} tokens; pick one token")
    return np.asarray(ti.token_table(params, name)[ids[0]], np.float32)


def scatter_rows(frozen: dict, rows: dict, ids: dict) -> dict:
    """The frozen params with each encoder's trained ``rows`` written at the new tokens' ``ids``."""
    out = dict(frozen)
    for name, r in rows.items():
        table = jnp.asarray(ti.token_table(out, name))
        out = ti.with_token_table(out, name, table.at[ids[name]].set(r.astype(table.dtype)))
    return out


class TextualInversion(Objective):
    def __init__(self, cfg, comps, params):
        c = cfg.textual_inversion
        n = int(c.get("num_vectors", 1))
        if n < 1:
            raise ValueError(f"textual_inversion.num_vectors must be >= 1, got {n}")
        start = {name: np.repeat(initializer_row(comps, params, name, c.initializer_token)[None], n, 0)
                 for name in comps.text_names}  # fmt: skip
        emb = ti.Embedding(c.token, start if comps.sdxl else {ti.ONLY: start["text_encoder"]}, "textual_inversion")
        comps, params = ti.add_embeddings(comps, params, [emb])
        super().__init__(cfg, comps, params)
        self.trained = comps.text_names  # every encoder learns its rows (SDXL: both, as diffusers' SDXL example)
        self.tokens = emb.tokens()
        self.ids = dict(zip(comps.text_names, (jnp.asarray(i) for i in ti.token_ids(comps, self.tokens))))
        self.start = {k: jnp.asarray(v) for k, v in start.items()}
        self.prompt_ids = self._prompt_ids(c.get("prompt") or "")

    def _prompt_ids(self, prompt: str):
        if not prompt:
            return None
        if self.cfg.textual_inversion.token not in prompt:
            raise ValueError(f"textual_inversion.prompt={prompt!r} does not hold the token {self.tokens[0]!r}")
        from sd_jax.tokenizer import tokenize

        return [tokenize(t, [prompt]) for t in self.comps.tokenizers]

    # -- what is trained: the new rows; the whole model is frozen --

    def frozen_names(self):
        return tuple(self.params)

    def init_trainable(self):
        return dict(self.start)

    def trainable_shardings(self, param_shardings, mesh):
        replicated = NamedSharding(mesh, PartitionSpec())  # a few rows
        return {n: replicated for n in self.start}

    def merged(self, rows, frozen):
        return scatter_rows(frozen, rows, self.ids)

    def loss(self, rows, frozen, batch, key):
        if self.prompt_ids is not None:  # one training prompt for every image
            b = batch["images"].shape[0]
            batch = dict(batch)
            for k, ids in zip(("input_ids", "input_ids_2"), self.prompt_ids):
                batch[k] = jnp.broadcast_to(jnp.asarray(ids), (b, ids.shape[-1]))
        return diffusion_loss(self.comps, self.cfg, self.merged(rows, frozen), batch, key, self.trained)

    # -- the result: one learned_embeds.safetensors --

    def embedding_tensors(self, state, use_ema=True) -> dict:
        rows = {k: np.asarray(v, np.float32) for k, v in self.trained_weights(state, use_ema).items()}
        if self.comps.sdxl:
            return {key: rows[name] for key, name in zip(SDXL_KEYS, self.comps.text_names)}
        return {self.tokens[0]: rows["text_encoder"]}

    def finish(self, workdir, state, log=print):
        if jax.process_index() != 0:
            return {}
        path = self.export(workdir, state, pathlib.Path(workdir) / EMBEDS_FILE)
        log(f"wrote {path}")
        return {"embedding_file": path}

    def export(self, workdir, state, out, *, use_ema=True):
        """The rows as a diffusers ``learned_embeds.safetensors`` (a folder gets that name)."""
        from sd_jax.loading.safetensors_io import write_safetensors

        out = pathlib.Path(out)
        if out.is_dir() or not out.suffix:
            out.mkdir(parents=True, exist_ok=True)
            out = out / EMBEDS_FILE
        write_safetensors(out, self.embedding_tensors(state, use_ema))
        return out
