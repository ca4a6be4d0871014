"""Text conditioning for training: one CLIP encoder (SD 1/2) or SDXL's two plus its micro-conditioning.

SDXL (diffusers ``train_text_to_image_sdxl.py``): the penultimate hidden states of
CLIP-L and OpenCLIP bigG concatenated as ``context``, bigG's projected pooled output
as ``text_embeds``, and ``time_ids`` = original size, crop top-left, target size.
The combination and the time ids are the sampling pipeline's own functions
(``sd_jax.pipelines.prompts``), so training and sampling condition alike.
"""

from __future__ import annotations

import jax
import numpy as np

from sd_jax.pipelines.prompts import sdxl_text_conditioning, sdxl_time_ids
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


def encode_text(models, p, batch) -> dict:
    """The U-Net's text conditioning: SD 1/2 the last hidden state; SDXL both encoders' penultimate states,
    the pooled ``text_embeds`` and the micro-conditioning ``time_ids`` (target size = the batch's image size)."""

    def run(module, name, ids):
        out = module.apply({"params": p[name]}, ids)
        return out if name in models.trainable else jax.lax.stop_gradient(out)

    if not models.sdxl:
        return {"context": run(models.text, "text_encoder", batch["input_ids"]).last_hidden_state}
    outs = [run(models.text, "text_encoder", batch["input_ids"]),
            run(models.text_2, "text_encoder_2", batch["input_ids_2"])]  # fmt: skip
    cond = sdxl_text_conditioning(outs)
    cond["time_ids"] = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["images"].shape[1:3])
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


def load_tokenizers(models) -> list:
    """The checkpoint's tokenizer (the shipped CLIP vocabulary from scratch), and SDXL's ``tokenizer_2``.

    Data sources tokenize captions once; SDXL's second ids are the first's re-padded, which is exact only when
    both tokenizers share vocabulary and specials (true of SDXL): checked here on probe captions.
    """
    from sd_jax.tokenizer import fit_to_encoder, load_tokenizer, tokenize

    folder = models.path
    toks = [fit_to_encoder(load_tokenizer(folder / "tokenizer" if folder else None),
                           models.text.config.max_position_embeddings)]  # fmt: skip
    if models.sdxl:
        tok2 = fit_to_encoder(load_tokenizer(folder / "tokenizer_2"), models.text_2.config.max_position_embeddings)
        probe = ["a photo of a cat", "", "an oil painting, 4k"]
        repadded = repad(tokenize(toks[0], probe), toks[0].eos_token_id, tok2.pad_token_id)
        same = toks[0].get_vocab() == tok2.get_vocab() and (repadded == tokenize(tok2, probe)).all()
        if not same:
            raise ValueError(
                f"{folder}: tokenizer and tokenizer_2 differ in more than the padding token; SDXL training "
                "needs a data source that provides 'input_ids_2'"
            )
        toks.append(tok2)
    return toks
