"""Training objectives: the diffusion loss (eps / v targets, min-SNR-gamma, offset noise) and the VAE loss.

The noise schedule comes from the checkpoint (``NoiseSchedule``); zero terminal
SNR is the schedule option ``rescale_betas_zero_snr`` (Lin et al. 2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sd_jax.parametrization import training_target
from sd_jax.schedules import NoiseSchedule


def diffusion_loss(model_fn, x0, key, schedule: NoiseSchedule, *, min_snr_gamma=None, offset_noise=0.0,
                   prior_mask=None, prior_weight=1.0):  # fmt: skip
    """Mean over the batch of the (weighted) MSE between the model output and its target.

    ``model_fn(x_t, t) -> output``; ``x0`` are clean (scaled) latents, NHWC.
    min-SNR-gamma: Hang et al. 2023, weight min(SNR, gamma) / SNR for eps
    (/ (SNR + 1) for v). Offset noise: Guttenberg 2023, a per-channel constant added to the noise.
    ``prior_mask`` (1 for class images): DreamBooth's prior preservation (Ruiz et al. 2023), the mean loss of the
    instance rows plus ``prior_weight`` times that of the class rows, both reported.
    """
    ac = jnp.asarray(schedule.alphas_cumprod())
    k_t, k_n, k_o = jax.random.split(key, 3)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    if offset_noise:
        noise = noise + offset_noise * jax.random.normal(k_o, (b, 1, 1, x0.shape[-1]))
    a = ac[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
    out = model_fn(x_t, t).astype(jnp.float32)
    target = training_target(schedule.prediction_type, x0, noise, a)
    per_example = jnp.mean((out - target) ** 2, axis=(1, 2, 3))
    if min_snr_gamma:
        snr = ac[t] / (1 - ac[t])
        w = jnp.minimum(snr, min_snr_gamma)
        w = w / (snr + 1) if schedule.prediction_type == "v_prediction" else w / snr
        per_example = per_example * w
    aux = {"t_mean": jnp.mean(t.astype(jnp.float32))}
    if prior_mask is None:
        return jnp.mean(per_example), aux
    m = prior_mask.astype(jnp.float32)
    instance = jnp.sum(per_example * (1 - m)) / jnp.maximum(jnp.sum(1 - m), 1.0)
    prior = jnp.sum(per_example * m) / jnp.maximum(jnp.sum(m), 1.0)
    return instance + prior_weight * prior, {**aux, "instance_loss": instance, "prior_loss": prior}


def vae_loss(recon, images, mean, logvar, *, kind="l1", kl_weight=1e-6):
    """Reconstruction (L1 or L2, per pixel) plus KL to N(0, I) (per latent element, summed as diffusers does)."""
    err = jnp.abs(recon - images) if kind == "l1" else (recon - images) ** 2
    rec = jnp.mean(err)
    kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    return rec + kl_weight * kl, {"rec": rec, "kl": kl}
