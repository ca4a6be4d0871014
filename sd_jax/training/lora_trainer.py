"""LoRA fine-tuning (and DreamBooth) of a frozen Stable Diffusion: only the adapters are trained.

Reuses :mod:`sd_jax.training.trainer` (models, optimizer, sharded state, checkpoints, loop); what changes is
what the optimizer sees. The state's ``params`` (and the optimizer moments) are the LoRA factors only; the
base weights are one frozen, non-donated argument of the jitted step, and the loss runs the unchanged
models on ``W + alpha/rank * down @ up`` (:func:`sd_jax.models.lora.apply_lora`).

``cfg.train`` names the adapted components (``("unet",)`` or ``("unet", "text_encoder")``); ``cfg.lora``
holds the rank, alpha and target module names. The result is written as
``WORKDIR/pytorch_lora_weights.safetensors`` in diffusers/peft naming (``--export`` writes it anew).
"""

from __future__ import annotations

import pathlib

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sd_jax.models.lora import Lora, apply_lora, init_lora
from sd_jax.training import trainer as base

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' ``load_lora_weights(folder)`` looks for


class LoraTrainer(base.Trainer):
    def __init__(self, cfg, mesh=None):
        bad = set(cfg.train) - {"unet", "text_encoder"}
        if bad or not cfg.train:
            raise ValueError(f"LoRA: train must name 'unet' and/or 'text_encoder', got {tuple(cfg.train)}")
        super().__init__(cfg, mesh)

    # -- what is trained: the adapters; every base component is frozen --

    def split_params(self, pshard):
        lc = self.cfg.lora
        targets = {"unet": tuple(lc.unet_targets), "text_encoder": tuple(lc.text_targets)}
        targets = {n: targets[n] for n in self.models.trainable}
        params = {n: self.models.params[n] for n in targets}
        self.lora = init_lora(params, targets, lc.rank, lc.alpha, jax.random.key(self.cfg.seed + 1))
        self.scales = self.lora.scales()
        replicated = NamedSharding(self.mesh, PartitionSpec())  # adapters are small
        return ("unet", "vae", "text_encoder"), jax.tree.map(lambda _: replicated, self.lora.params)

    def trainable_init(self):
        return self.lora.params

    def loss(self, lora, frozen, batch, key):
        eff = apply_lora(frozen, lora, self.scales)
        adapted = {n: eff[n] for n in self.models.trainable}
        rest = {n: v for n, v in eff.items() if n not in adapted}
        return base.loss_fn(self.models, self.cfg, adapted, rest, batch, key)

    def merged_params(self, lora, frozen) -> dict:
        return apply_lora(frozen, lora, self.scales)

    def adapter(self, state, use_ema=True) -> Lora:
        trained = state["ema"] if use_ema and state.get("ema") is not None else state["params"]
        return Lora(jax.device_get(trained), dict(self.lora.alphas))


def make_source(cfg, log=print):
    """The data: an image folder / synthetic set, or DreamBooth's instance (+ class) folders."""
    if cfg.data.source != "dreambooth":
        return None  # the trainer's own make_source
    from sd_jax.training.dreambooth import DreamBoothData, prepare_class_images

    if cfg.data.with_prior_preservation:
        prepare_class_images(cfg, log=log)
    return DreamBoothData(cfg.data, base.tokenizer_for(cfg))


def train(cfg, workdir, *, log=print, stop_at: int | None = None, mesh=None) -> dict:
    """Train (or resume) the adapters; at the end write ``WORKDIR/pytorch_lora_weights.safetensors``."""
    from sd_jax.loading.lora import save_lora

    source = make_source(cfg, log)  # first: class images are sampled before the trainer holds its state
    t = LoraTrainer(cfg, mesh)
    m = base.train(cfg, workdir, log=log, stop_at=stop_at, trainer=t, source=source)
    if jax.process_index() == 0 and m.get("state") is not None:
        m["lora_file"] = save_lora(pathlib.Path(workdir) / LORA_FILE, t.adapter(m["state"]))
        log(f"wrote {m['lora_file']}")
    return m


def export(cfg, workdir, out, *, use_ema=True, mesh=None) -> pathlib.Path:
    """The latest checkpoint's adapters as one diffusers-named ``.safetensors`` (a folder gets the diffusers name)."""
    from sd_jax.loading.lora import save_lora
    from sd_jax.training.checkpoints import require_checkpoint, restore_for_export

    require_checkpoint(workdir)  # before the base model loads
    t = LoraTrainer(cfg, mesh)
    state, _ = restore_for_export(t, workdir, cfg)
    return save_lora(out, t.adapter(state, use_ema))
