"""What an objective supplies to the training loop (:mod:`sd_jax.training.loop`), with the defaults of training
whole components.

The loop owns the mesh, the sharded state ``{"step", "params", "ema", "opt", "rng"}``, the jitted step,
checkpoints, logging, guard rails and samples. An objective says what the optimizer updates (its ``params``),
which components stay frozen (one non-donated argument of the step), the loss, and what a finished run writes.
"""

from __future__ import annotations

import pathlib

import jax

from sd_jax.components import Components


class Objective:
    """Whole components trained: ``cfg.train`` names them; the rest are frozen."""

    def __init__(self, cfg, comps: Components, params: dict):
        self.cfg, self.comps, self.params = cfg, comps, params
        self.trained = tuple(cfg.train)
        self.check_trained()

    def check_trained(self) -> None:
        """``cfg.train`` names components of this model (an objective that builds its own net checks otherwise)."""
        unknown = [n for n in self.trained if n not in self.params]
        if unknown:
            raise ValueError(f"config.train names {unknown}, but this model has only {sorted(self.params)}")

    @classmethod
    def prepare(cls, cfg, workdir, log=print) -> None:
        """Work done before the models are built (DreamBooth samples its class images here)."""

    # -- what is optimized --

    def frozen_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.params if n not in self.trained)

    def init_trainable(self):
        """The pytree the optimizer updates (the state's ``params``)."""
        return {n: self.params[n] for n in self.trained}

    def trainable_shardings(self, param_shardings: dict, mesh):
        """Shardings of :meth:`init_trainable`'s pytree, given every component's parameter shardings."""
        return {n: param_shardings[n] for n in self.trained}

    def merged(self, trainable, frozen) -> dict:
        """Every component's full weights (what samples during training use)."""
        return {**frozen, **trainable}

    # -- the loss --

    def loss(self, trainable, frozen, batch, key):
        """``(loss, aux metrics)`` of one batch; jitted inside the step."""
        raise NotImplementedError

    # -- the result --

    def finish(self, workdir, state, log=print) -> dict:
        """What the end of a run writes (beside its checkpoints); extra entries for the returned metrics."""
        return {}

    def trained_weights(self, state, use_ema: bool = True):
        """The state's EMA (when kept and wanted) or raw trained pytree, on the host."""
        trained = state["ema"] if use_ema and state.get("ema") is not None else state["params"]
        return jax.device_get(trained)

    def export(self, workdir, state, out, *, use_ema: bool = True) -> pathlib.Path:
        raise NotImplementedError
