"""Text conditioning for training: one CLIP encoder (SD 1/2) or SDXL's two plus its micro-conditioning.

SDXL (diffusers ``train_text_to_image_sdxl.py``): the penultimate hidden states of CLIP-L and OpenCLIP bigG
concatenated as ``context``, bigG's projected pooled output as ``text_embeds``, and ``time_ids`` = original size,
crop top-left, target size. The encoding is :func:`sd_jax.components.encode_prompt`, the sampling pipeline's own,
so training and sampling condition alike.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np

from sd_jax import components as C
from sd_jax.tokenizer import repad


def check_text_conditioning(where, ucfg, tcfg, tcfg2):
    """The U-Net's cross-attention and added-embedding widths must match what the text encoders produce."""
    sdxl_unet = ucfg.addition_embed_type == "text_time"
    if sdxl_unet != (tcfg2 is not None):
        raise ValueError(
            f"{where}: the U-Net has addition_embed_type={ucfg.addition_embed_type!r} but the checkpoint has "
            f"{'two text encoders' if tcfg2 else 'one text encoder'}; SDXL fine-tuning needs text_encoder and "
            "text_encoder_2 with an addition_embed_type='text_time' U-Net (the refiner is not supported)"
        )
    width = tcfg.hidden_size + (tcfg2.hidden_size if tcfg2 else 0)
    if width != ucfg.cross_attention_dim:
        raise ValueError(f"{where}: text encoder width {width} != unet cross_attention_dim {ucfg.cross_attention_dim}")
    if tcfg2 is not None:
        added = (tcfg2.projection_dim or 0) + 6 * ucfg.addition_time_embed_dim
        if not tcfg2.projection_dim or added != ucfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"{where}: text_encoder_2 projection_dim {tcfg2.projection_dim} + 6 time ids x "
                f"{ucfg.addition_time_embed_dim} != unet projection_class_embeddings_input_dim "
                f"{ucfg.projection_class_embeddings_input_dim}"
            )


def text_conditioning(comps: C.Components, params: dict, batch: dict, trained=()) -> dict:
    """The U-Net's conditioning for a pixel batch: :func:`~sd_jax.components.encode_prompt` of its ids (encoders not
    in ``trained`` pass no gradient), and for SDXL the ``time_ids`` (target size = the batch's image size)."""
    p = {n: params[n] if n in trained else jax.lax.stop_gradient(params[n]) for n in comps.text_names}
    ids = [batch["input_ids"], batch.get("input_ids_2")][: len(comps.text_encoders)]
    cond = C.encode_prompt(comps, p, ids)
    if comps.sdxl:
        cond["time_ids"] = C.sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["images"].shape[1:3])
    return cond


def sdxl_batch_extras(batch: dict, tokenizers) -> dict:
    """The second encoder's ids (the first's re-padded, unless the source gives ``input_ids_2``) and the crop
    micro-conditioning, defaulting to an uncropped square of the batch's image size."""
    n, h, w = batch["images"].shape[:3]
    ids_2 = batch.get("input_ids_2")
    if ids_2 is None:
        ids_2 = repad(batch["input_ids"], tokenizers[0].eos_token_id, tokenizers[1].pad_token_id)
    return {
        "input_ids_2": np.asarray(ids_2, np.int32),
        "original_size": np.asarray(batch.get("original_size", np.full((n, 2), (h, w))), np.int32),
        "crop_top_left": np.asarray(batch.get("crop_top_left", np.zeros((n, 2))), np.int32),
    }


def check_tokenizers(comps: C.Components) -> None:
    """Data sources tokenize captions once with the first tokenizer; SDXL's second ids are those re-padded, which is
    exact only when both tokenizers share vocabulary and specials (true of SDXL): checked on probe captions."""
    if not comps.sdxl:
        return
    from sd_jax.tokenizer import tokenize

    tok, tok2 = comps.tokenizers
    probe = ["a photo of a cat", "", "an oil painting, 4k"]
    repadded = repad(tokenize(tok, probe), tok.eos_token_id, tok2.pad_token_id)
    if tok.get_vocab() != tok2.get_vocab() or not (repadded == tokenize(tok2, probe)).all():
        raise ValueError(
            f"{comps.path}: tokenizer and tokenizer_2 differ in more than the padding token; SDXL training "
            "needs a data source that provides 'input_ids_2'"
        )


# -- deprecated names (the former trainer.Models interface) --


def encode_text(models, p, batch) -> dict:
    """Deprecated: :func:`text_conditioning` of ``(components, params)``."""
    warnings.warn("conditioning.encode_text(models, ...) is deprecated; use text_conditioning(comps, params, batch, "
                  "trained)", DeprecationWarning, stacklevel=2)  # fmt: skip
    return text_conditioning(models.components, p, batch, models.trainable)


def load_tokenizers(models) -> list:
    """Deprecated: the tokenizers are ``components.tokenizers`` (checked by :func:`check_tokenizers`)."""
    warnings.warn("conditioning.load_tokenizers(models) is deprecated; use components.tokenizers",
                  DeprecationWarning, stacklevel=2)  # fmt: skip
    check_tokenizers(models.components)
    return list(models.components.tokenizers)
