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
    freeze = tuple(cfg.get("freeze", ()) or ())
    if freeze:  # sub-trees held fixed inside a trained component (e.g. fine-tune a VAE decoder alone)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, lambda p: freeze_labels(p, freeze))
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def freeze_labels(params, prefixes) -> dict:
    """Label "freeze" every leaf whose "/"-joined path (e.g. ``vae/encoder/conv_in/kernel``) starts with one of
    ``prefixes``, "train" otherwise. A prefix that matches nothing is an error, not a silent no-op."""
    used, tops = set(), set()

    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        tops.add("/".join(name.split("/")[:2]))
        hit = [q for q in prefixes if name == q or name.startswith(q.rstrip("/") + "/")]
        used.update(hit)
        return "freeze" if hit else "train"

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [q for q in prefixes if q not in used]
    if unused:
        raise ValueError(f"optim.freeze: {unused} match no parameter; trained sub-trees start with {sorted(tops)}")
    return labels


def ema_decay(cfg, step):
    """The EMA decay used for the update made at 0-based ``step``: ``optim.ema_decay``, or with
    ``optim.ema_warmup`` as diffusers' ``EMAModel`` does, 0 at the first update and then at most
    ``(1 + step) / (10 + step)``, so the average does not keep the random init for thousands of steps."""
    if not cfg.get("ema_warmup", False):
        return jnp.float32(cfg.ema_decay)
    n = jnp.asarray(step, jnp.float32)
    return jnp.where(n < 1, 0.0, jnp.minimum(cfg.ema_decay, (1 + n) / (10 + n)))


def ema_update(ema, params, decay):
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p.astype(jnp.float32)).astype(e.dtype), ema, params)
