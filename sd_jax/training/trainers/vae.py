"""The VAE objective (``train=("vae",)``): reconstruction (L1 or L2) plus a small KL term,
:func:`sd_jax.training.objectives.vae_loss`; the export records the latent ``scaling_factor`` users need."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import components as C
from sd_jax.models import vae as vae_lib
from sd_jax.training import objectives
from sd_jax.training.trainers.diffusion import Diffusion


def vae_loss(comps: C.Components, cfg, params: dict, batch: dict, key):
    images = batch["images"]
    mean, logvar = C.encode_posterior(comps, params, images)
    z = vae_lib.DiagonalGaussian(mean, logvar).sample(key)  # unscaled: the decoder's own input
    recon = comps.vae.apply({"params": params["vae"]}, z, method=vae_lib.AutoencoderKL.decode)
    o = cfg.objective
    return objectives.vae_loss(recon.astype(jnp.float32), images, mean, logvar, kind=o.vae_loss,
                               kl_weight=o.kl_weight)  # fmt: skip


def latent_scaling_factor(comps: C.Components, vae_params, source, *, batches: int = 8, batch_size: int = 64):
    """``1 / std`` of the posterior means over a few training batches (how SD's 0.18215 was chosen)."""
    encode = jax.jit(lambda p, x: C.encode_posterior(comps, {"vae": p}, x)[0])
    z = np.concatenate([np.asarray(encode(vae_params, source.batch(i, batch_size)["images"])) for i in range(batches)])
    return float(1.0 / (z.std() + 1e-8))


class Vae(Diffusion):
    """Whole-VAE training; the rest of the pipeline is exported unchanged."""

    def loss(self, trainable, frozen, batch, key):
        return vae_loss(self.comps, self.cfg, {**frozen, **trainable}, batch, key)

    def export(self, workdir, state, out, *, use_ema=True):
        # a frozen encoder keeps its loaded scale: the latents (and any U-Net trained on them) stay the same
        if "vae/encoder" in tuple(self.cfg.optim.get("freeze", ()) or ()):
            return super().export(workdir, state, out, use_ema=use_ema)
        from sd_jax.data import make_source

        vae_params = self.trained_weights(state, use_ema)["vae"]
        source = make_source(self.cfg.data, self.comps.tokenizers[0], workdir=workdir)
        scale = latent_scaling_factor(self.comps, vae_params, source)
        vae_config = dataclasses.replace(self.comps.vae.config, scaling_factor=scale)
        return super().export(workdir, state, out, use_ema=use_ema, vae_config=vae_config)
