"""``python -m sd_jax.training.cache --config configs/NAME.py --out DIR [--workdir DIR] [--config.x=y ...]``."""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file (its model and data)", lock_config=True)
flags.DEFINE_string("out", None, "cache directory (default: the config's data.cache)")
flags.DEFINE_string("workdir", None, "where an image folder is prepared when data.data_dir is not set")
flags.DEFINE_integer("batch_size", 16, "images encoded per call")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "stored precision")


def _main(argv):
    del argv
    from sd_jax.training.cache import build_cache

    cfg = FLAGS.config
    out = FLAGS.out or cfg.data.get("cache")
    if not out:
        raise app.UsageError("--out (or --config.data.cache) is required")
    build_cache(cfg, out, workdir=FLAGS.workdir, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)


def main():
    flags.mark_flags_as_required(["config"])
    app.run(_main)
