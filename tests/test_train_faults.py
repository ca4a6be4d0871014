"""Training faults: damaged checkpoints fall back to an older step, non-finite metrics are caught on every step
without being saved, signals are recorded (not raised), and a step that cannot fit is refused before it runs."""

import os
import signal
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sd_jax.training import checkpoints as ckpt
from sd_jax.training.memory import MemoryEstimateError, check_step_memory
from sd_jax.training.preemption import Preempted, StopSignals


def state_at(step):
    w = jnp.full((256, 256), float(step))
    return {"step": jnp.asarray(step, jnp.int32), "w": w, "opt": optax.adam(1e-3).init(w)}


def fake_trainer():
    """What restore_or_init needs of a Trainer, around a tiny two-array state (no model: seconds)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    rep = NamedSharding(mesh, PartitionSpec())
    # optimizer state as the trainer's (optax named tuples): without _METADATA orbax cannot rebuild that tree
    init = state_at(0)
    return types.SimpleNamespace(
        abstract_state=jax.eval_shape(lambda: init),
        state_sh=jax.tree.map(lambda _: rep, init),
        init_state=lambda: init,
    )


def saved_run(tmp_path, steps=(1, 2, 3)):
    cfg = ml_collections.ConfigDict({"keep_checkpoints": 5, "checkpoint_every": 1})
    import orbax.checkpoint as ocp

    mgr = ckpt.checkpoint_manager(tmp_path, cfg)
    for s in steps:
        state = state_at(s)
        mgr.save(s, args=ocp.args.StandardSave(state), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return cfg


def truncate_data_files(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["truncated data file", "deleted _METADATA"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_that_restores(tmp_path, damage):
    cfg = saved_run(tmp_path)
    step3 = tmp_path / "checkpoints" / "3"
    if damage == "truncated data file":
        truncate_data_files(step3)
    else:
        next(step3.rglob("_METADATA")).unlink()
    lines = []
    mgr = ckpt.checkpoint_manager(tmp_path, cfg)
    state, step = ckpt.restore_or_init(fake_trainer(), mgr, log=lines.append)
    assert step == 2 and int(state["step"]) == 2 and float(state["w"][0, 0]) == 2.0
    warnings = [x for x in lines if x.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoints/3 does not restore" in warnings[0] and "\n" not in warnings[0]
    # moved aside, so the resumed run can save step 3 again
    assert mgr.all_steps() == [1, 2] and (tmp_path / "corrupt_checkpoints" / "3").is_dir() and not step3.exists()
    mgr.close()


def test_no_checkpoint_restores_is_one_error_naming_the_folder(tmp_path):
    cfg = saved_run(tmp_path, steps=(1, 2))
    for s in (1, 2):
        next((tmp_path / "checkpoints" / str(s)).rglob("_METADATA")).unlink()
    mgr = ckpt.checkpoint_manager(tmp_path, cfg)
    with pytest.raises(ckpt.CheckpointRestoreError, match=r"checkpoints: none of the kept checkpoints restores") as e:
        ckpt.restore_or_init(fake_trainer(), mgr, log=lambda s: None)
    mgr.close()
    assert "2 (" in str(e.value) and "1 (" in str(e.value)  # never a silent restart from step 0


def test_export_refuses_a_run_without_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointRestoreError, match="no checkpoint to export yet"):
        ckpt.require_checkpoint(tmp_path)


def test_finite_guard_names_the_first_bad_step_and_metric_without_syncing_each_step():
    guard = ckpt.FiniteGuard()
    for step in range(1, 6):
        loss = {3: jnp.nan, 4: jnp.inf}.get(step, 0.5)
        guard.update({"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0 if step != 4 else jnp.inf)}, step)
        assert isinstance(guard.first_bad, jax.Array)  # stays on device until check()
    with pytest.raises(ckpt.NonFiniteLoss, match=r"^step 3: loss is nan; stopped without saving \(the last "
                       r"checkpoint is step 2\)"):  # fmt: skip
        guard.check(2)
    fine = ckpt.FiniteGuard()
    fine.update({"loss": jnp.float32(1.0)}, 1)
    fine.check(None)  # no raise


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_are_recorded_not_raised(sig, code):
    before = signal.getsignal(sig)
    with StopSignals() as s:
        os.kill(os.getpid(), sig)  # SIGINT would raise KeyboardInterrupt here without the handler
        assert s.signum == sig
    assert signal.getsignal(sig) == before
    e = Preempted(7, sig, saved=True)
    assert e.exit_code == code and str(e).endswith("preempted at step 7; saved")


def test_memory_estimate_refuses_before_the_step_runs():
    f = jax.jit(lambda x: (x @ x.T).sum()).lower(jnp.ones((512, 512), jnp.float32)).compile()
    cfg = ml_collections.ConfigDict({"max_memory_gb": 1e-4, "batch_size": 8, "compute_dtype": "bfloat16",
                                     "data": {"image_size": 512}})  # fmt: skip
    with pytest.raises(MemoryEstimateError, match=r"needs about .* GB per device, more than the 0\.0 GB allowed.*"
                       r"--config.batch_size.*--config.max_memory_gb"):  # fmt: skip
        check_step_memory(f, cfg)
    cfg.max_memory_gb = 0  # off
    assert check_step_memory(f, cfg) >= 512 * 512 * 4
    cfg.max_memory_gb = 100.0
    assert check_step_memory(f, cfg) >= 512 * 512 * 4
