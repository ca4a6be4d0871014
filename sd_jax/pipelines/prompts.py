"""Prompt -> U-Net conditioning for SD 1.x/2.x (one encoder) and SDXL (two), as diffusers' pipelines build it.

- SD 1.x / 2.x: the last hidden state (after the final layer norm); ``clip_skip``
  takes an earlier layer's output through the final layer norm instead.
- SDXL: penultimate hidden states of both encoders, concatenated on features,
  and the second encoder's projected pooled output as ``text_embeds``. With
  ``force_zeros_for_empty_prompt`` an absent negative prompt is all zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.clip import CLIPTextModel
from sd_jax.tokenizer import tokenize


def sdxl_text_conditioning(outs, clip_skip: int | None = None) -> dict[str, jax.Array]:
    """SDXL's U-Net conditioning from both encoders' outputs (diffusers ``StableDiffusionXLPipeline.encode_prompt``).

    ``context``: the penultimate hidden states (``clip_skip`` layers earlier) of every encoder, concatenated on
    features; ``text_embeds``: the last encoder's projected pooled output.
    """
    layer = -2 - (clip_skip or 0)
    context = jnp.concatenate([o.hidden_states[layer] for o in outs], axis=-1)
    return {"context": context, "text_embeds": outs[-1].text_embeds}


def sdxl_time_ids(original_size, crop_top_left, target_size) -> jax.Array:
    """SDXL micro-conditioning ``[B, 6]`` float32: original (h, w), crop (top, left), target (h, w).

    Each argument is a pair or a ``[B, 2]`` array; pairs are broadcast over the batch (Podell et al. 2023,
    section 2.2; diffusers ``_get_add_time_ids``).
    """
    parts = [jnp.asarray(a, jnp.float32).reshape(-1, 2) for a in (original_size, crop_top_left, target_size)]
    b = max(p.shape[0] for p in parts)
    return jnp.concatenate([jnp.broadcast_to(p, (b, 2)) for p in parts], axis=-1)


@dataclasses.dataclass
class TextEncoders:
    """The text side of a checkpoint: one or two (tokenizer, CLIP module, params) triples."""

    tokenizers: list
    modules: list[CLIPTextModel]
    params: list[Any]
    sdxl: bool = False
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self):
        self._encode = [jax.jit(m.apply) for m in self.modules]

    def ids(self, prompts: Sequence[str]) -> list[np.ndarray]:
        return [tokenize(tok, list(prompts)) for tok in self.tokenizers]

    def encode_ids(self, ids: list[np.ndarray], clip_skip: int | None = None) -> dict[str, jax.Array]:
        outs = [enc({"params": p}, i) for enc, p, i in zip(self._encode, self.params, ids)]
        if not self.sdxl:
            out = outs[0]
            if clip_skip:
                ln = self.params[0]["text_model"]["final_layer_norm"]
                h = out.hidden_states[-(clip_skip + 1)]
                eps = self.modules[0].config.layer_norm_eps
                context = nn.LayerNorm(epsilon=eps).apply({"params": ln}, h)
            else:
                context = out.last_hidden_state
            return {"context": context}
        return sdxl_text_conditioning(outs, clip_skip)

    def encode(self, prompts: Sequence[str], clip_skip: int | None = None) -> dict[str, jax.Array]:
        return self.encode_ids(self.ids(prompts), clip_skip)

    def encode_negative(self, negative: Sequence[str] | None, n: int, clip_skip: int | None = None):
        """The unconditional side of CFG: the negative prompts, or "" (or zeros for SDXL)."""
        if negative is None and self.sdxl and self.force_zeros_for_empty_prompt:
            pos = self.encode([""] * n, clip_skip)
            return jax.tree.map(jnp.zeros_like, pos)
        return self.encode(list(negative) if negative is not None else [""] * n, clip_skip)
