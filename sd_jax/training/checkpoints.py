"""Checkpoints (orbax): the manager, a restore that falls back past damaged steps, and the non-finite guard.

A checkpoint that does not restore (a truncated data file, a deleted ``_METADATA``, a state of another shape) is
named in one warning line and moved to ``WORKDIR/corrupt_checkpoints/STEP``; the next older kept step is tried.
When none restores the run stops with :class:`CheckpointRestoreError` naming the folder: it never silently
starts again from step 0.

The guard keeps an on-device record of the first step whose metrics were not finite, updated by a tiny jitted
function after every step (no host sync); the loop reads it only where it syncs anyway (log steps) and before
every save, so a non-finite state is never written.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import jax.numpy as jnp

from sd_jax.errors import SDJaxError


class CheckpointRestoreError(SDJaxError, RuntimeError):
    """No kept checkpoint of a run restores."""


class NonFiniteLoss(SDJaxError, RuntimeError):
    """A training metric became NaN or inf; nothing from that step on was saved."""


def checkpoint_manager(workdir, cfg):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, save_interval_steps=cfg.checkpoint_every)
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=opts)


def _reason(e: BaseException) -> str:
    """The first line of an orbax/tensorstore error (they run to pages), kept short."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text.split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:200]}"


def restore_or_init(trainer, mgr, *, log=print, quarantine: bool = True):
    """(state, step): the newest kept checkpoint that restores, else a fresh state at step 0 when none exists.

    ``quarantine``: move a checkpoint that fails aside (out of ``checkpoints/``), so the resumed run can save that
    step again; export leaves the folder as it is."""
    import orbax.checkpoint as ocp

    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        return trainer.init_state(), 0
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_state, trainer.state_sh
    )
    folder = pathlib.Path(mgr.directory)
    failed = []
    for step in steps:
        try:
            state = mgr.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax and tensorstore raise many kinds for a damaged checkpoint
            failed.append(f"{step} ({_reason(e)})")
            where = ""
            if quarantine and jax.process_index() == 0:
                dest = folder.parent / "corrupt_checkpoints" / str(step)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                shutil.move(str(folder / str(step)), dest)
                where = f"; moved to {dest}"
            log(f"warning: checkpoint {folder / str(step)} does not restore ({_reason(e)}){where}")
            continue
        if quarantine and failed:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("sd_jax: corrupt checkpoints moved")
            mgr.reload()
            log(f"resuming from step {step}")
        return state, int(step)
    raise CheckpointRestoreError(
        f"{folder}: none of the kept checkpoints restores ({'; '.join(failed)}); fix the config if it changed "
        f"since they were written, or move the folder away to start again from step 0"
    )


# -- the non-finite guard --


@jax.jit
def _track(first_bad, metrics, step):
    """``first_bad`` is ``[step, nan mask, inf mask]`` of the first step whose metrics were not all finite
    (``[-1, 0, 0]`` while none was); bit i of a mask is metric i in sorted-name order."""
    names = sorted(metrics)
    vals = [jnp.asarray(metrics[k], jnp.float32) for k in names]
    nan = sum(jnp.any(jnp.isnan(v)).astype(jnp.int32) << i for i, v in enumerate(vals))
    inf = sum(jnp.any(jnp.isinf(v)).astype(jnp.int32) << i for i, v in enumerate(vals))
    new = (first_bad[0] < 0) & ((nan | inf) > 0)
    return jnp.where(new, jnp.stack([jnp.asarray(step, jnp.int32), nan, inf]), first_bad)


class FiniteGuard:
    """Every step's metrics checked on device; :meth:`check` (a host sync) raises :class:`NonFiniteLoss`."""

    def __init__(self):
        self.first_bad = jnp.asarray([-1, 0, 0], jnp.int32)
        self.names: list[str] = []

    def update(self, metrics, step: int) -> None:
        self.names = sorted(metrics)
        self.first_bad = _track(self.first_bad, metrics, step)

    def check(self, last_saved: int | None) -> None:
        step, nan, inf = (int(x) for x in jax.device_get(self.first_bad))
        if step < 0:
            return
        bad = [f"{n} is {'nan' if nan >> i & 1 else 'inf'}" for i, n in enumerate(self.names) if (nan | inf) >> i & 1]
        saved = f"the last checkpoint is step {last_saved}" if last_saved else "no checkpoint was written"
        raise NonFiniteLoss(f"step {step}: {', '.join(bad)}; stopped without saving ({saved}); "
                            "lower optim.lr, set optim.clip_norm or check the data")  # fmt: skip


def require_checkpoint(workdir) -> None:
    """Refuse (cheaply, before any model loads) a run folder with no checkpoint yet."""
    folder = pathlib.Path(workdir).absolute() / "checkpoints"
    if not folder.is_dir() or not any(p.name.isdigit() for p in folder.iterdir()):
        raise CheckpointRestoreError(f"{folder}: no checkpoint to export yet; train first (with the same --workdir)")


def restore_for_export(trainer, workdir, cfg):
    """(state, step) of the newest checkpoint that restores (damaged ones are left where they are)."""
    mgr = checkpoint_manager(workdir, cfg)
    try:
        return restore_or_init(trainer, mgr, quarantine=False)
    finally:
        mgr.close()
