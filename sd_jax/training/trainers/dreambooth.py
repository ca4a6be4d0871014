"""DreamBooth (Ruiz et al. 2023): a subject from a few instance photos bound to a rare token, with prior
preservation on class images that the frozen model samples before training (``data.source='dreambooth'``).

The data (:class:`sd_jax.data.dreambooth.DreamBoothSource`) appends a class row per instance row and marks them
with ``prior_mask``; the diffusion loss then reports ``instance_loss`` and ``prior_loss`` and optimizes
``instance_loss + objective.prior_loss_weight * prior_loss``. Adapters (``trainer='lora'``) or whole components.
"""

from __future__ import annotations

from sd_jax.training.trainers.diffusion import Diffusion
from sd_jax.training.trainers.lora import Lora


def sample_class_images(cfg, log=print) -> None:
    """Fill ``data.class_path`` with samples of ``data.class_prompt`` (with prior preservation only)."""
    if cfg.data.get("with_prior_preservation"):
        from sd_jax.training.dreambooth import prepare_class_images

        prepare_class_images(cfg, log=log)


class DreamBoothLora(Lora):
    @classmethod
    def prepare(cls, cfg, workdir, log=print):
        sample_class_images(cfg, log)  # before the trainer holds its state


class DreamBooth(Diffusion):
    @classmethod
    def prepare(cls, cfg, workdir, log=print):
        sample_class_images(cfg, log)
