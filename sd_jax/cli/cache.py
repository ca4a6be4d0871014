"""``python -m sd_jax.training.cache --config configs/NAME.py --out DIR [--workdir DIR] [--config.x=y ...]``.

Config files and overrides are read as by ``train.py``; errors are one line (exit 2 usage, 1 runtime; ``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from sd_jax.cli.train_config import UsageError, apply_overrides, load_config, split_overrides


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} ; see python -m sd_jax.training.cache --help", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> None:
    overrides, rest = split_overrides(sys.argv[1:] if argv is None else list(argv))
    p = _Parser(prog="python -m sd_jax.training.cache", description="Cache VAE latents and text embeddings.")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="training config file (its model and data)")
    p.add_argument("--out", help="cache directory (default: the config's data.cache)")
    p.add_argument("--workdir", help="where an image folder is prepared when data.data_dir is not set")
    p.add_argument("--batch_size", type=int, default=16, help="images encoded per call")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored precision")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(rest)
    from sd_jax.errors import SDJaxError

    try:
        cfg = apply_overrides(load_config(args.config), overrides)
        cfg.lock()
        out = args.out or cfg.data.get("cache")
        if not out:
            raise UsageError("--out (or --config.data.cache) is required")
        if args.batch_size < 1:
            raise UsageError(f"--batch_size {args.batch_size}: must be >= 1")
        from sd_jax.training.cache import build_cache

        build_cache(cfg, out, workdir=args.workdir, batch_size=args.batch_size, dtype=args.dtype)
    except (UsageError, SDJaxError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, (UsageError, ValueError)) else 1) from None
