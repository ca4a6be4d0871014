"""``python -m sd_jax.training.cache --config configs/NAME.py --out DIR [--workdir DIR] [--config.x=y ...]``.

Config files and overrides are read as by ``train.py``; errors are one line (exit 2 usage, 1 runtime; ``--debug``
shows the traceback). :func:`cache_from_config` builds the run's frozen VAE and text encoder (:func:`load_encoders`)
and hands them, as encode functions, to :func:`sd_jax.data.cache.build_cache`.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

from sd_jax.cli.train_config import UsageError, apply_overrides, load_config, split_overrides


class Encoders(NamedTuple):
    encode_images: object  # [N, S, S, 3] in [-1, 1] -> (posterior mean, logvar)
    encode_text: object  # input ids [N, T] -> last hidden state [N, T, D]
    weights: str  # sd_jax.data.cache.weights_fingerprint of their params
    tokenizer: object


def load_encoders(cfg) -> Encoders:
    """The run's frozen VAE encoder and text encoder as jitted functions (the one place that builds the models)."""
    import jax
    import jax.numpy as jnp

    from sd_jax import components as C
    from sd_jax.data.cache import check_cacheable, weights_fingerprint
    from sd_jax.training.model import build

    comps, params = build(cfg)
    check_cacheable(cfg, sdxl=comps.sdxl)
    frozen = {n: params[n] for n in ("vae", "text_encoder")}

    @jax.jit
    def posterior(p, images):
        mean, logvar = C.encode_posterior(comps, p, images)
        return mean.astype(jnp.float32), logvar.astype(jnp.float32)

    @jax.jit
    def context(p, ids):
        return C.encode_text(comps, p, [ids]).last_hidden_state.astype(jnp.float32)

    return Encoders(lambda images: posterior(frozen, images), lambda ids: context(frozen, ids),
                    weights_fingerprint(params), comps.tokenizers[0])  # fmt: skip


def cache_from_config(cfg, out, *, workdir=None, batch_size: int = 16, dtype: str = "float32", log=print):
    """Encode every record of ``cfg.data``'s dataset with ``cfg``'s VAE and text encoder into ``out``."""
    from sd_jax.data.cache import build_cache, check_cacheable
    from sd_jax.data.tfds import TfdsSource, tfds_builder

    check_cacheable(cfg)  # before the models load
    enc = load_encoders(cfg)
    source = TfdsSource(tfds_builder(cfg.data, workdir), cfg.data, enc.tokenizer, process_index=0, process_count=1)
    return build_cache(source, enc.encode_images, enc.encode_text, out, weights=enc.weights, batch_size=batch_size,
                       dtype=dtype, log=log)  # fmt: skip


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
        cache_from_config(cfg, out, workdir=args.workdir, batch_size=args.batch_size, dtype=args.dtype)
    except (UsageError, SDJaxError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, (UsageError, ValueError)) else 1) from None
