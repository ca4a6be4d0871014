"""LoRA fine-tuning of a frozen Stable Diffusion (Hu et al. 2021): only the adapters are trained.

The state's ``params`` (and the optimizer moments) are the LoRA factors only; every base component is one frozen,
non-donated argument of the step, and the loss runs the unchanged models on ``W + alpha/rank * down @ up``
(:func:`sd_jax.models.lora.apply_lora`). ``cfg.train`` names the adapted components: ``unet``, ``text_encoder``
and, for SDXL, ``text_encoder_2`` (both encoders take ``lora.text_targets``, or ``lora.text_2_targets`` for the
second). The run writes ``WORKDIR/pytorch_lora_weights.safetensors`` in diffusers/peft naming
(``text_encoder_2.<module>`` for SDXL's second encoder).
"""

from __future__ import annotations

import pathlib

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sd_jax.models import lora as lora_lib
from sd_jax.training.trainers.base import Objective
from sd_jax.training.trainers.diffusion import diffusion_loss

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' ``load_lora_weights(folder)`` looks for
ADAPTABLE = ("unet", "text_encoder", "text_encoder_2")


class Lora(Objective):
    def __init__(self, cfg, comps, params):
        allowed = ADAPTABLE[: 1 + len(comps.text_encoders)]
        bad = set(cfg.train) - set(allowed)
        if bad or not cfg.train:
            raise ValueError(f"LoRA: train must name components among {list(allowed)}, got {tuple(cfg.train)}")
        super().__init__(cfg, comps, params)
        lc = cfg.lora
        text = tuple(lc.text_targets)
        targets = {"unet": tuple(lc.unet_targets), "text_encoder": text,
                   "text_encoder_2": tuple(lc.get("text_2_targets") or text)}  # fmt: skip
        targets = {n: targets[n] for n in self.trained}
        self.lora = lora_lib.init_lora({n: params[n] for n in targets}, targets, lc.rank, lc.alpha,
                              jax.random.key(cfg.seed + 1))  # fmt: skip
        self.scales = self.lora.scales()

    # -- what is trained: the adapters; every base component is frozen --

    def frozen_names(self):
        return tuple(self.params)

    def init_trainable(self):
        return self.lora.params

    def trainable_shardings(self, param_shardings, mesh):
        replicated = NamedSharding(mesh, PartitionSpec())  # adapters are small
        return jax.tree.map(lambda _: replicated, self.lora.params)

    def merged(self, lora, frozen):
        return lora_lib.apply_lora(frozen, lora, self.scales)

    def loss(self, lora, frozen, batch, key):
        params = lora_lib.apply_lora(frozen, lora, self.scales)
        return diffusion_loss(self.comps, self.cfg, params, batch, key, self.trained)

    # -- the result: one .safetensors of adapters --

    def adapter(self, state, use_ema=True) -> lora_lib.Lora:
        return lora_lib.Lora(self.trained_weights(state, use_ema), dict(self.lora.alphas))

    def finish(self, workdir, state, log=print):
        if jax.process_index() != 0:
            return {}
        path = self.export(workdir, state, pathlib.Path(workdir) / LORA_FILE)
        log(f"wrote {path}")
        return {"lora_file": path}

    def export(self, workdir, state, out, *, use_ema=True):
        """The adapters as one diffusers-named ``.safetensors`` (a folder gets the diffusers name)."""
        from sd_jax.loading.lora import save_lora

        return save_lora(out, self.adapter(state, use_ema))
