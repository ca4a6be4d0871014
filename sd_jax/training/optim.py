"""Optimizer from config: AdamW, warmup then cosine/constant, global-norm clipping, accumulation; EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate(cfg):
    warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine":
        rest = optax.cosine_decay_schedule(
            cfg.lr, max(cfg.steps - cfg.warmup_steps, 1), alpha=cfg.get("lr_min_ratio", 0.0)
        )
    elif cfg.lr_schedule == "constant":
        rest = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
    return optax.join_schedules([warm, rest], [cfg.warmup_steps])


def optimizer(cfg):
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
        optax.adamw(learning_rate(cfg), b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), weight_decay=cfg.weight_decay),
    )
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def ema_update(ema, params, decay):
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p.astype(jnp.float32)).astype(e.dtype), ema, params)
