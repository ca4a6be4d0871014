"""``python train.py --config configs/NAME.py --workdir DIR [--config.x=y ...]``."""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and exports go here")
flags.DEFINE_string("export", None, "instead of training: export the latest checkpoint (diffusers folder; LoRA: file)")
flags.DEFINE_bool("export_raw", False, "export the raw weights instead of the EMA")
flags.DEFINE_string("coordinator", None, "multi-host: coordinator address host:port (else from the environment)")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


def _main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO

    if FLAGS.coordinator or FLAGS.num_processes:
        # CPU processes talk over gloo (only affects the CPU backend; must be set before initialize).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    from sd_jax.training import lora_trainer, trainer

    cfg = FLAGS.config
    run = {"diffusion": trainer, "lora": lora_trainer}[cfg.get("trainer", "diffusion")]
    if FLAGS.workdir is None:
        print("error: --workdir is required", file=sys.stderr)
        raise SystemExit(2)
    try:
        if FLAGS.export:
            out = run.export(cfg, FLAGS.workdir, FLAGS.export, use_ema=not FLAGS.export_raw)
            print(f"wrote {out}")
            return
        m = run.train(cfg, FLAGS.workdir)
    except trainer.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    print(f"done: step {m.get('step')} loss {m.get('loss', float('nan')):.4f}")


def main():
    flags.mark_flags_as_required(["config"])
    app.run(_main)
