"""One objective per kind of training, plugged into the one loop (:mod:`sd_jax.training.loop`).

- :mod:`~sd_jax.training.trainers.base`: what an objective supplies (split, loss, export) and the defaults;
- :mod:`~sd_jax.training.trainers.diffusion`: eps / v prediction of the U-Net (and text encoder);
- :mod:`~sd_jax.training.trainers.vae`: the VAE's reconstruction + KL loss, the latent scale on export;
- :mod:`~sd_jax.training.trainers.lora`: adapters on a frozen model (SDXL's second encoder included);
- :mod:`~sd_jax.training.trainers.dreambooth`: class images first, then the diffusion loss with prior preservation;
- :mod:`~sd_jax.training.trainers.controlnet`: a ControlNet on a frozen model (``trainer='controlnet'``);
- :mod:`~sd_jax.training.trainers.textual_inversion`: a new token's rows (``trainer='textual_inversion'``).
"""

from __future__ import annotations

from sd_jax.training.trainers.base import Objective


def objective_for(cfg) -> type[Objective]:
    """The objective a config asks for: ``trainer`` ('diffusion' or 'lora'), ``data.source`` ('dreambooth') and
    ``train`` (``("vae",)`` trains the VAE)."""
    from sd_jax.training.trainers.diffusion import Diffusion
    from sd_jax.training.trainers.dreambooth import DreamBooth, DreamBoothLora
    from sd_jax.training.trainers.lora import Lora
    from sd_jax.training.trainers.vae import Vae

    dreambooth = cfg.data.get("source") == "dreambooth"
    if cfg.get("trainer", "diffusion") == "controlnet":
        from sd_jax.training.trainers.controlnet import ControlNet

        return ControlNet
    if cfg.get("trainer", "diffusion") == "textual_inversion":
        from sd_jax.training.trainers.textual_inversion import TextualInversion

        return TextualInversion
    if cfg.get("trainer", "diffusion") == "lora":
        return DreamBoothLora if dreambooth else Lora
    if dreambooth:
        return DreamBooth
    return Vae if tuple(cfg.train) == ("vae",) else Diffusion


__all__ = ["Objective", "objective_for"]
