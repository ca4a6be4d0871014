"""Long prompts and prompt weighting: AUTOMATIC1111's chunked CLIP encoding (``modules/sd_hijack_clip.py``).

**Chunks.** A prompt is parsed for attention (:func:`sd_jax.prompt_parser.parse_prompt_attention`), each piece
tokenized on its own, and the tokens, each carrying its piece's weight, are cut into chunks of ``L - 2`` tokens
(``L`` the tokenizer's length: 75 tokens for every SD checkpoint, 14 for the 16-position embedded model). Each
chunk is wrapped in BOS/EOS and padded to ``L`` (EOS, then the tokenizer's own padding after the first EOS: SD 2.x
and SDXL's second encoder pad with ``!``), encoded on its own by :func:`sd_jax.components.encode_prompt`, and the
hidden states concatenated along the sequence: a 120-token prompt gives 154 positions. As in A1111:

- ``BREAK`` ends a chunk early (the rest padded);
- "comma padding backtrack" (A1111's default 20): when a chunk is full and the last comma is at most 20 tokens
  back, the tokens after that comma move to the next chunk;
- a multi-vector textual-inversion token's vectors (``t, t_1, ...``) are never split across chunks;
- prompts of a batch, and the prompt and its negative, are padded with empty chunks (BOS, EOS, padding) to one
  chunk count; the pooled output (SDXL ``text_embeds``) is the first chunk's.

A prompt of at most ``L - 2`` tokens without ``BREAK`` is one chunk with exactly the ids of the plain tokenizer
(diffusers' ``padding="max_length"``), so its encoding is bit-identical to the plain path's. A prompt of more than
``max_chunks`` chunks (A1111 has no cap; ours defaults to 8, ``pipe.max_prompt_chunks``) is refused with its
length.

**Emphasis** (how the weights act on the hidden states ``z`` of one chunk; ``pipe.emphasis``):

- ``"a1111"``: A1111's default "Original": ``z * w`` per token, then rescaled so the chunk's mean equals the
  unweighted mean. Each SDXL encoder's hidden states (CLIP-L 768, bigG 1280 wide) get their own mean restore,
  as A1111 weights each embedder separately before concatenating.
- ``"comfy"``: ComfyUI's default (``comfy/sd1_clip.py``, ``encode_token_weights``): ``z_empty + (z - z_empty) * w``
  at the tokens whose weight is not 1, ``z_empty`` the encoding of the empty prompt at the same positions; no mean
  restore. (ComfyUI cuts chunks at 75 tokens without the comma backtrack; we chunk the A1111 way for every mode.)
- ``"none"``: the syntax is parsed (brackets removed, ``BREAK`` honoured) and the weights ignored: A1111's
  "Ignore". (A1111's "None", which reads brackets as literal text, is not offered; escape them with ``\\(``.)

Deviations from A1111: the mean restore is per prompt and chunk (A1111 takes one mean over its batch, which there is
the same prompt repeated), so an image does not depend on its batch-mates; the prompt and negative are always
padded to one chunk count (A1111's "pad prompt/negative prompt to be same length" setting), as cond and uncond run
in one batch here; the chunk length follows the tokenizer (75 for real checkpoints, as A1111's fixed 75).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import components as C
from sd_jax import tokenizer as T
from sd_jax.errors import SDJaxError
from sd_jax.prompt_parser import BREAK, parse_prompt_attention

EMPHASES = ("a1111", "comfy", "none")
MAX_CHUNKS = 8
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


class PromptTooLongError(SDJaxError, ValueError):
    """A prompt needs more chunks than the cap allows."""


@dataclasses.dataclass(frozen=True)
class Chunks:
    """One tokenizer's chunked batch: ``ids`` int32 and ``weights`` float32, both ``[B, chunks, L]``, and each
    prompt's token count (BOS/EOS/padding not counted)."""

    ids: np.ndarray
    weights: np.ndarray
    tokens: tuple[int, ...]

    @property
    def count(self) -> int:
        return self.ids.shape[1]


def check_emphasis(emphasis: str) -> str:
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis {emphasis!r} is not one of {', '.join(EMPHASES)}")
    return emphasis


# -- chunking --


_COMMAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def comma_id(tokenizer) -> int | None:
    """The id of ``,</w>`` (None if the vocabulary lacks it), looked up once per tokenizer: ``get_vocab()``
    builds a 49k-entry dict, ~50 ms, which per prompt was a tenth of a second per image in the server's batches."""
    try:
        return _COMMAS[tokenizer]
    except (KeyError, TypeError):
        comma = tokenizer.get_vocab().get(",</w>")
    try:
        _COMMAS[tokenizer] = comma
    except TypeError:  # not weakly referenceable: look it up every time
        pass
    return comma


def chunk_prompt(tokenizer, prompt: str, backtrack: int = COMMA_BACKTRACK) -> tuple[list, list, int]:
    """``(ids, weights, tokens)`` of one prompt: ``ids``/``weights`` lists of ``L``-long chunks (A1111's
    ``tokenize_line``), ``tokens`` the prompt's token count."""
    size = T.max_length_of(tokenizer) - 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    comma = comma_id(tokenizer)
    groups = T.vector_groups(tokenizer)
    parsed = parse_prompt_attention(prompt)
    texts = [text for text, weight in parsed if not (text == BREAK and weight == -1)]
    tokenized = iter(T.tokenize_text(tokenizer, texts))
    chunks: list[tuple[list, list]] = []
    ids: list[int] = []
    ws: list[float] = []
    last_comma = -1
    total = 0

    def close():
        nonlocal ids, ws, last_comma
        body = ids + [eos] * (size - len(ids))
        row = [bos, *body, eos]
        first_eos = row.index(eos)
        row = row[: first_eos + 1] + [pad] * (len(row) - first_eos - 1)  # the tokenizer's padding after EOS
        chunks.append((row, [1.0, *ws, *[1.0] * (size - len(ws)), 1.0]))
        ids, ws, last_comma = [], [], -1

    for text, weight in parsed:
        if text == BREAK and weight == -1:
            close()
            continue
        toks = next(tokenized)
        total += len(toks)
        pos = 0
        while pos < len(toks):
            tok = toks[pos]
            if tok == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == size and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                moved, moved_w = ids[cut:], ws[cut:]
                ids, ws = ids[:cut], ws[:cut]
                close()
                ids, ws = moved, moved_w
            if len(ids) == size:
                close()
            group = groups.get(tok)
            n = len(group) if group and toks[pos : pos + len(group)] == group else 1
            if n > 1 and len(ids) + n > size:
                close()
            ids += toks[pos : pos + n]
            ws += [float(weight)] * n
            pos += n
    if ids or not chunks:
        close()
    return [c[0] for c in chunks], [c[1] for c in chunks], total


def empty_chunk(tokenizer) -> list[int]:
    """BOS, EOS, padding: the empty prompt's ids (A1111's ``empty_chunk`` re-padded)."""
    n = T.max_length_of(tokenizer)
    return [tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (n - 2)


def tokenize_chunks(comps: C.Components, prompts: Sequence[str], max_chunks: int = MAX_CHUNKS,
                    min_chunks: int = 1) -> list[Chunks]:  # fmt: skip
    """Every tokenizer's :class:`Chunks` of ``prompts``, all padded with empty chunks to one count (at least
    ``min_chunks``). A prompt over ``max_chunks`` chunks raises :class:`PromptTooLongError`."""
    per_tok = []
    for tok in comps.tokenizers:
        rows = [chunk_prompt(tok, p) for p in prompts]
        for i, (ids, _, total) in enumerate(rows):
            if len(ids) > max_chunks:
                size = T.max_length_of(tok) - 2
                raise PromptTooLongError(
                    f"prompt {i} is {total} tokens long, {len(ids)} chunks of {size}; at most {max_chunks} chunks "
                    f"({max_chunks * size} tokens) are allowed: shorten it, or raise the cap "
                    "(--max-prompt-chunks N, pipe.max_prompt_chunks)"
                )
        per_tok.append(rows)
    n = max([min_chunks] + [len(ids) for rows in per_tok for ids, _, _ in rows])
    return [pad_chunks(_stack(tok, rows), tok, n) for tok, rows in zip(comps.tokenizers, per_tok)]


def _stack(tok, rows) -> Chunks:
    n = max(len(ids) for ids, _, _ in rows)
    empty, ones = empty_chunk(tok), [1.0] * T.max_length_of(tok)
    ids = [r[0] + [empty] * (n - len(r[0])) for r in rows]
    ws = [r[1] + [ones] * (n - len(r[1])) for r in rows]
    return Chunks(np.asarray(ids, np.int32), np.asarray(ws, np.float32), tuple(r[2] for r in rows))


def pad_chunks(chunks: Chunks, tokenizer, n: int) -> Chunks:
    """``chunks`` with empty chunks (weight 1) appended up to ``n``."""
    extra = n - chunks.count
    if extra <= 0:
        return chunks
    b, length = chunks.ids.shape[0], chunks.ids.shape[2]
    ids = np.broadcast_to(np.asarray(empty_chunk(tokenizer), np.int32), (b, extra, length))
    ws = np.ones((b, extra, length), np.float32)
    return Chunks(np.concatenate([chunks.ids, ids], 1), np.concatenate([chunks.weights, ws], 1), chunks.tokens)


# -- encoding --


@functools.partial(jax.jit, static_argnums=(0, 3))
def encode_ids(comps, text_params, ids, clip_skip):
    """:func:`sd_jax.components.encode_prompt`, jitted: one compile per ids shape."""
    return C.encode_prompt(comps, text_params, ids, clip_skip)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _emphasize(z, ws, z_empty, emphasis: str, widths: tuple[int, ...]):
    """``z [N, L, D]`` (the encoders' hidden states side by side, ``widths`` wide) with each encoder's weights
    ``ws[i] [N, L]`` applied; rows whose weights are all 1 are returned as they are."""
    parts, lo = [], 0
    for w, width in zip(ws, widths):
        part, wf = z[..., lo : lo + width].astype(jnp.float32), w[..., None]
        if emphasis == "a1111":
            scaled = part * wf
            parts.append(scaled * (part.mean(axis=(1, 2), keepdims=True) / scaled.mean(axis=(1, 2), keepdims=True)))
        else:  # comfy
            ze = z_empty[..., lo : lo + width].astype(jnp.float32)
            parts.append(jnp.where(wf != 1.0, ze + (part - ze) * wf, part))
        lo += width
    out = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    plain = jnp.all(jnp.stack(ws) == 1.0, axis=(0, 2))[:, None, None]
    return jnp.where(plain, z, out.astype(z.dtype))


def encode_chunks(comps: C.Components, params: dict, chunks: Sequence[Chunks], clip_skip: int | None = None,
                  emphasis: str = "a1111") -> dict:  # fmt: skip
    """Chunked ids (one :class:`Chunks` per tokenizer, one count) -> ``{"context": [B, chunks * L, D]}`` (SDXL
    adds the first chunk's ``text_embeds``), every chunk encoded by one call of :func:`encode_ids` on
    ``[B * chunks, L]`` ids, then weighted by ``emphasis``."""
    check_emphasis(emphasis)
    b, n, length = chunks[0].ids.shape
    text_params = {name: params[name] for name in comps.text_names}
    ids = tuple(c.ids.reshape(b * n, length) for c in chunks)
    out = dict(encode_ids(comps, text_params, ids, clip_skip or None))
    weights = tuple(c.weights.reshape(b * n, length) for c in chunks)
    if emphasis != "none" and not all(np.all(w == 1.0) for w in weights):
        z_empty = None
        if emphasis == "comfy":
            empty = tuple(np.asarray([empty_chunk(tok)], np.int32) for tok in comps.tokenizers)
            z_empty = encode_ids(comps, text_params, empty, clip_skip or None)["context"]
        widths = tuple(int(m.config.hidden_size) for m in comps.text_encoders)
        out["context"] = _emphasize(out["context"], tuple(map(jnp.asarray, weights)), z_empty, emphasis, widths)
    out["context"] = out["context"].reshape(b, n * length, -1)
    if "text_embeds" in out:
        out["text_embeds"] = out["text_embeds"].reshape(b, n, -1)[:, 0]
    return out
