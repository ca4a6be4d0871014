"""The training loop, for every objective: mesh, models, sharded state, one jitted step, checkpoints, the loop.

State is a plain dict ``{"step", "params", "ema", "opt", "rng"}``. Its shapes come from ``jax.eval_shape`` and
``jit(out_shardings=...)`` builds it already sharded; the step donates it. Parameters, EMA and optimizer moments
are sharded by the logical-axis rules in the config (``dp``, ``fsdp``, ``fsdp_tp``). What is optimized, the loss
and the export come from the objective (:mod:`sd_jax.training.trainers`), chosen from the config.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sd_jax import placement
from sd_jax import sharding as shard_lib
from sd_jax.training import model as model_lib
from sd_jax.training.checkpoints import (
    FiniteGuard,
    checkpoint_manager,
    require_checkpoint,
    restore_for_export,
    restore_or_init,
)
from sd_jax.training.conditioning import check_tokenizers, sdxl_batch_extras
from sd_jax.training.optim import ema_decay, ema_update, learning_rate, optimizer
from sd_jax.training.preemption import Preempted, StopSignals
from sd_jax.training.trainers import Objective, objective_for

# -- sharding --


def _like_params(tree, pshard, mesh):
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path gets its sharding."""
    flat = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(pshard)[0]:
        flat[tuple(k.key for k in path)] = sh

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            if keys[i:] in flat:
                return flat[keys[i:]]
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, tree)


# -- the state and the step --


class Trainer:
    """The models, the objective and the sharded, jitted update step of one run.

    ``objective`` (default: the config's, built on :func:`sd_jax.training.model.build`) decides what the state's
    ``params`` are and the loss; everything here is the same for every objective."""

    def __init__(self, cfg, mesh=None, objective: Objective | None = None):
        self.cfg = cfg
        self.mesh = mesh or shard_lib.make_mesh(dict(cfg.mesh))
        if objective is None:
            comps, params = model_lib.build(cfg)
            objective = objective_for(cfg)(cfg, comps, params)
        self.objective = objective
        self.comps, self.params = objective.comps, objective.params
        check_tokenizers(self.comps)
        self.tokenizers = list(self.comps.tokenizers)
        self.tx = optimizer(cfg.optim)
        self.lr = learning_rate(cfg.optim)
        pshard = placement.param_shardings(self.comps, self.params, self.mesh, cfg.sharding)
        self.frozen_names = objective.frozen_names()
        self.param_sh = objective.trainable_shardings(pshard, self.mesh)
        self.frozen_sh = {n: pshard[n] for n in self.frozen_names}
        self.abstract_state = jax.eval_shape(self._init_state, objective.init_trainable())
        self.state_sh = {
            "step": NamedSharding(self.mesh, PartitionSpec()),
            "params": self.param_sh,
            "ema": self.param_sh if cfg.optim.ema_decay else None,
            "opt": _like_params(self.abstract_state["opt"], self.param_sh, self.mesh),
            "rng": NamedSharding(self.mesh, PartitionSpec()),
        }
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_sh, self.frozen_sh, None),  # the batch comes placed by put_batch
            out_shardings=(self.state_sh, NamedSharding(self.mesh, PartitionSpec())),
            donate_argnums=(0,),
        )

    @property
    def models(self) -> model_lib.ModelView:
        """``(components, params)`` as data sources' ``check_models`` read them."""
        return model_lib.ModelView(self.comps, self.params, self.objective.trained)

    def loss(self, trainable, frozen, batch, key):
        return self.objective.loss(trainable, frozen, batch, key)

    def merged_params(self, trainable, frozen) -> dict:
        return self.objective.merged(trainable, frozen)

    def _init_state(self, trainable):
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": trainable,
            "ema": trainable if self.cfg.optim.ema_decay else None,
            "opt": self.tx.init(trainable),
            "rng": jax.random.key_data(jax.random.key(self.cfg.seed)),
        }

    def init_state(self):
        return jax.jit(self._init_state, out_shardings=self.state_sh)(self.objective.init_trainable())

    def frozen(self):
        return jax.device_put({n: self.params[n] for n in self.frozen_names}, self.frozen_sh)

    def _train_step(self, state, frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def f(p):
            return self.loss(p, frozen, batch, key)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema is not None:
            ema = ema_update(ema, params, ema_decay(self.cfg.optim, state["step"]))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": self.lr(state["step"]), **aux}
        return {"step": state["step"] + 1, "params": params, "ema": ema, "opt": opt, "rng": state["rng"]}, metrics

    def put_batch(self, batch):
        """Each process holds its own slice of the global batch (pixels and ids, or cached latents and context)."""
        if self.comps.sdxl:
            batch = {**batch, **sdxl_batch_extras(batch, self.tokenizers)}
        out = {}
        for k, v in batch.items():
            ints = k.startswith("input_ids") or k in ("original_size", "crop_top_left")
            v = np.asarray(v, np.int32 if ints else np.float32)
            out[k] = _global(v, shard_lib.batch_sharding(self.mesh, v.ndim))
        return out

    def step(self, state, frozen, batch):
        return self._step(state, frozen, self.put_batch(batch))


def _global(local: np.ndarray, sharding):
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


# -- the loop --


@dataclasses.dataclass
class Result:
    """What :func:`run` returns: the last metrics (plus the objective's outputs, e.g. ``lora_file``), the final
    state and the trainer that made it."""

    metrics: dict
    state: dict
    trainer: Trainer


def train(cfg, workdir, *, objective: type[Objective] | None = None, log=None, stop_at: int | None = None,
          mesh=None, trainer: Trainer | None = None, source=None) -> dict:  # fmt: skip
    """Run (or resume) training to ``cfg.steps``; returns the last metrics (:func:`run` also returns the state)."""
    return run(cfg, workdir, objective=objective, log=log, stop_at=stop_at, mesh=mesh, trainer=trainer,
               source=source).metrics  # fmt: skip


def run(cfg, workdir, *, objective: type[Objective] | None = None, log=None, stop_at: int | None = None,
        mesh=None, trainer: Trainer | None = None, source=None) -> Result:  # fmt: skip
    """Run (or resume) training to ``cfg.steps``. ``stop_at`` ends early (tests).

    ``objective`` (a class from :mod:`sd_jax.training.trainers`) defaults to the config's; ``trainer`` and
    ``source`` default to a :class:`Trainer` and the config's data source. Raises
    :class:`~sd_jax.training.preemption.Preempted` after saving on SIGTERM/SIGINT, :class:`NonFiniteLoss` (before
    any non-finite state is saved), :class:`~sd_jax.training.checkpoints.CheckpointRestoreError` when no kept
    checkpoint restores, and :class:`~sd_jax.training.memory.MemoryEstimateError` before the first step when the
    step would not fit.
    """
    import orbax.checkpoint as ocp

    from sd_jax.data import make_source
    from sd_jax.training.memory import check_step_memory
    from sd_jax.training.monitor import Monitor

    workdir = pathlib.Path(workdir)
    with StopSignals() as signals:
        if trainer is None:
            kind = objective or objective_for(cfg)
            kind.prepare(cfg, workdir, log=log or print)  # before the models hold memory
            comps, params = model_lib.build(cfg)
            trainer = Trainer(cfg, mesh, kind(cfg, comps, params))
        mgr = checkpoint_manager(workdir, cfg)
        state, start = restore_or_init(trainer, mgr, log=log or print)
        frozen = trainer.frozen()
        source = source or make_source(cfg.data, trainer.tokenizers[0], workdir=workdir)
        source.check_models(trainer.models, cfg)  # e.g. the latent cache must come from these weights
        sample_every = cfg.get("sample_every") or 0
        if sample_every:
            from sd_jax.training.samples import SampleRenderer

            renderer = SampleRenderer(trainer.comps, trainer.params, cfg)
        per_host = cfg.batch_size // jax.process_count()
        end = min(cfg.steps, stop_at) if stop_at else cfg.steps
        step_fn, placed = None, None
        if start < end:  # compile once, and refuse before the first step when it cannot fit
            placed = trainer.put_batch(source.batch(start, per_host, offset=jax.process_index() * per_host))
            step_fn = trainer._step.lower(state, frozen, placed).compile()
            check_step_memory(step_fn, cfg)
        monitor = Monitor(cfg, workdir, start, log=log)
        log = monitor.log
        guard = FiniteGuard()
        metrics, saved = {}, (start or None)
        try:
            t0 = time.time()
            for step in range(start, end):
                if signals.signum is not None:  # arrived before the first step (while compiling)
                    break
                if step > start:
                    placed = trainer.put_batch(source.batch(step, per_host, offset=jax.process_index() * per_host))
                state, m = step_fn(state, frozen, placed)
                guard.update(m, step + 1)
                monitor.step()
                done = step + 1 == end or signals.signum is not None
                if (step + 1) % cfg.log_every == 0 or done:
                    guard.check(saved)
                    metrics = {k: float(v) for k, v in jax.device_get(m).items()}
                    dt = (time.time() - t0) / cfg.log_every
                    t0 = time.time()
                    metrics.update(step=step + 1, step_time=dt, images_per_s=cfg.batch_size / max(dt, 1e-9),
                                   skipped_images=source.skipped + source.prepared_skipped)  # fmt: skip
                    monitor.metrics(metrics)
                if sample_every and (step + 1) % sample_every == 0:
                    ts = time.time()
                    monitor.samples(step + 1, renderer.render(state, frozen, trainer.merged_params))
                    t0 += time.time() - ts  # sampling time is not training step time
                stop = done or signals.signum is not None
                if stop or mgr.should_save(step + 1):
                    guard.check(saved)  # never write a non-finite state
                    mgr.save(step + 1, args=ocp.args.StandardSave(state), force=stop)
                    saved = step + 1
                if stop:
                    break
            mgr.wait_until_finished()
        finally:
            monitor.close()
            mgr.close()
        if signals.signum is not None:
            raise Preempted(saved or start, signals.signum, saved=saved is not None and saved > start)
    metrics.update(trainer.objective.finish(workdir, state, log))
    return Result(metrics, state, trainer)


def export(cfg, workdir, out, *, use_ema=True, mesh=None) -> pathlib.Path:
    """The latest checkpoint as the objective writes it: a diffusers folder (EMA or raw weights), or for LoRA one
    diffusers-named ``.safetensors`` of adapters."""
    require_checkpoint(workdir)  # before the models load
    trainer = Trainer(cfg, mesh)
    state, _ = restore_for_export(trainer, workdir, cfg)
    return trainer.objective.export(workdir, state, out, use_ema=use_ema)
