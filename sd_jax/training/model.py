"""The run's models: one :class:`~sd_jax.components.Components` value and its float32 master weights.

:func:`build` reads ``config.init_from`` (a diffusers folder, single file or Hub id: fine-tuning) or ``config.model``
(from scratch, optionally with ``init_components`` loaded from earlier runs). The config's ``objective``
(``prediction_type``, ``zero_snr``) overrides the checkpoint's noise schedule, for the loss and for in-training
samples alike.
"""

from __future__ import annotations

import dataclasses

import jax

from sd_jax import components as C
from sd_jax.training.checks import scratch_model_configs
from sd_jax.training.conditioning import check_text_conditioning


def build(cfg) -> tuple[C.Components, dict]:
    """``(components, params)``: float32 masters, the U-Net and text encoders computing in ``compute_dtype``."""
    if cfg.get("init_from"):
        comps, params = C.load(cfg.init_from, dtype=cfg.compute_dtype, param_dtype="float32", vae_dtype="float32",
                               remat_policy=cfg.get("remat_policy"), attention=cfg.get("attention", "auto"),
                               conv=cfg.get("conv", "auto"))  # fmt: skip
        texts = [t.config for t in comps.text_encoders]
        check_text_conditioning(comps.path, comps.unet.config, texts[0], texts[1] if comps.sdxl else None)
    else:
        ucfg, vcfg, tcfg = scratch_model_configs(cfg)
        given = {}
        for name, src in dict(cfg.get("init_components") or {}).items():  # e.g. a VAE trained by an earlier run
            from sd_jax.loading.diffusers import load_component

            loaded_cfg, given[name] = load_component(src, name)
            ucfg, vcfg, tcfg = {"unet": (loaded_cfg, vcfg, tcfg), "vae": (ucfg, loaded_cfg, tcfg),
                                "text_encoder": (ucfg, vcfg, loaded_cfg)}[name]  # fmt: skip
        comps, params = C.from_configs(ucfg, vcfg, tcfg, jax.random.key(cfg.seed), dtype=cfg.compute_dtype,
                                       remat_policy=cfg.get("remat_policy"), params=given,
                                       attention=cfg.get("attention", "auto"),
                                       conv=cfg.get("conv", "auto"))  # fmt: skip
    comps = with_objective_schedule(comps, cfg.objective)
    return comps, params


def with_objective_schedule(comps: C.Components, objective) -> C.Components:
    """``objective.prediction_type`` / ``objective.zero_snr`` (when set) replace the checkpoint's, in the trained
    schedule and in the scheduler config that in-training samples read."""
    pred, zero_snr = objective.get("prediction_type") or None, bool(objective.get("zero_snr"))
    schedule = dataclasses.replace(
        comps.schedule,
        prediction_type=pred or comps.schedule.prediction_type,
        rescale_betas_zero_snr=zero_snr or comps.schedule.rescale_betas_zero_snr,
    )
    raw = dict(comps.scheduler_config)
    if pred:
        raw["prediction_type"] = pred
    if zero_snr:
        raw["rescale_betas_zero_snr"] = True
    return comps.replace(schedule=schedule, scheduler_config=raw)


@dataclasses.dataclass(frozen=True)
class ModelView:
    """``(components, params)`` with the attribute names of the former ``trainer.Models`` (``.params``, ``.sdxl``,
    ``.unet``, ``.vae``, ``.text``, ``.text_2``, ``.schedule``): what data sources' ``check_models`` read."""

    components: C.Components
    params: dict
    trainable: tuple[str, ...] = ()

    unet = property(lambda self: self.components.unet)
    vae = property(lambda self: self.components.vae)
    text = property(lambda self: self.components.text_encoders[0])
    text_2 = property(lambda self: self.components.text_encoders[1] if self.sdxl else None)
    schedule = property(lambda self: self.components.schedule)
    sdxl = property(lambda self: self.components.sdxl)
    path = property(lambda self: self.components.path)
    index = property(lambda self: self.components.index)
