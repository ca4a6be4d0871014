"""Classifier-free guidance as a wrapper around a conditional model.

Ho & Salimans 2022; guidance rescale from Lin et al. 2023 ("Common Diffusion
Noise Schedules and Sample Steps are Flawed", eq. 15-16), as diffusers'
``rescale_noise_cfg``. The unconditional and conditional passes run as one
batched model call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cfg_model(model, guidance_scale: float, guidance_rescale: float = 0.0):
    """Wrap ``model(x, t, cond)`` where ``cond`` holds the [uncond; cond] pair stacked on axis 0.

    With ``guidance_scale == 1`` the caller should pass only the conditional
    half and not use this wrapper (the unconditional pass is skipped).
    """

    def guided(x, t, cond):
        out = model(jnp.concatenate([x, x]), t, cond)
        uncond, text = jnp.split(out, 2)
        g = uncond + guidance_scale * (text - uncond)
        # guidance_rescale may be traced (one compile for every value); 0 leaves g untouched.
        axes = tuple(range(1, x.ndim))
        std_text = jnp.std(text, axis=axes, keepdims=True)
        std_g = jnp.std(g, axis=axes, keepdims=True)
        rescaled = guidance_rescale * (g * std_text / jnp.maximum(std_g, 1e-12)) + (1 - guidance_rescale) * g
        return jnp.where(guidance_rescale > 0, rescaled, g)

    return guided


def stack_conditioning(uncond, cond):
    """[uncond; cond] on the batch axis for every leaf of the conditioning pytree."""
    return jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
