"""The diffusion objective (eps / v prediction, min-SNR-gamma, offset noise): U-Net (and optionally text encoder
or VAE) trained on the noise-prediction loss of :func:`sd_jax.training.objectives.diffusion_loss`.

Latents are the VAE posterior's sample, scaled as :func:`sd_jax.components.sample_latents` writes once; with
the latent cache (``data.cache``) the posterior and text context come precomputed in the batch.
"""

from __future__ import annotations

import jax

from sd_jax import components as C
from sd_jax.data import schema
from sd_jax.training import objectives
from sd_jax.training.conditioning import text_conditioning
from sd_jax.training.trainers.base import Objective


def diffusion_loss(comps: C.Components, cfg, params: dict, batch: dict, key, trained=(), unet_extra=None):
    """``(loss, aux)`` of one batch with every component's weights in ``params``; components not in ``trained``
    pass no gradient. ``key`` draws the latent sample, then the timesteps and noise. ``unet_extra(x_t, t, cond)``
    returns more U-Net arguments (a ControlNet's residuals)."""
    k_enc, k_loss = jax.random.split(key)
    cached = schema.has_latents(batch)
    if cached:  # the latent cache: the posterior and the text context were computed once, offline
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
        mean, logvar = C.encode_posterior(comps, params, batch["images"])
    z = C.sample_latents(comps, mean, logvar, k_enc)
    if "vae" not in trained:
        z = jax.lax.stop_gradient(z)
    cond = {"context": batch["context"]} if cached else text_conditioning(comps, params, batch, trained)

    def model_fn(x_t, t):
        extra = unet_extra(x_t, t, cond) if unet_extra else {}
        return comps.unet.apply(
            {"params": params["unet"]},
            x_t,
            t,
            cond["context"],
            text_embeds=cond.get("text_embeds"),
            time_ids=cond.get("time_ids"),
            **extra,
        )

    o = cfg.objective
    return objectives.diffusion_loss(model_fn, z, k_loss, comps.schedule, min_snr_gamma=o.min_snr_gamma,
                                     offset_noise=o.offset_noise, prior_mask=batch.get("prior_mask"),
                                     prior_weight=o.get("prior_loss_weight", 1.0))  # fmt: skip


class Diffusion(Objective):
    def loss(self, trainable, frozen, batch, key):
        return diffusion_loss(self.comps, self.cfg, {**frozen, **trainable}, batch, key, self.trained)

    def export(self, workdir, state, out, *, use_ema=True, vae_config=None):
        """The trained weights with the frozen ones as a diffusers folder (``export_dtype`` float16 halves it)."""
        import numpy as np

        from sd_jax.loading.export import save_components

        params = {**self.params, **self.trained_weights(state, use_ema)}
        dtype = {None: None, "float32": None, "float16": np.float16}[self.cfg.get("export_dtype")]
        return save_components(out, self.comps, params, vae_config=vae_config, dtype=dtype)
