"""``python -m sd_jax.export``: convert any checkpoint we load into a diffusers folder (or a single file).

python -m sd_jax.export --model model.safetensors --out my_model/           # single file -> diffusers
python -m sd_jax.export --model my_model/ --out model.safetensors --single-file sd1

Exit status: 0 written; 2 a usage error (bad flag, output that is the wrong kind or not writable, a missing
model, --single-file of another architecture); 1 a model that does not load. Errors are one line (``--debug``
shows the traceback); nothing is left half-written.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

EXIT_USAGE, EXIT_RUNTIME = 2, 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} ; see python -m sd_jax.export --help", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _fail(e: BaseException, code: int, debug: bool):
    if debug:
        raise e
    print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
    raise SystemExit(code) from None


def main(argv=None) -> None:
    from sd_jax.convert.single_file import ARCHITECTURES

    p = _Parser(prog="python -m sd_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers folder, single file or Hub id")
    p.add_argument("--out", required=True, help="a folder (diffusers) or, with --single-file, a .safetensors file")
    p.add_argument("--config-dir", default=None, help="a diffusers folder whose configs describe a single file whose "
                   "architecture does not ship (tiny, resized or modified models)")  # fmt: skip
    p.add_argument("--single-file", metavar="ARCH", default=None, choices=ARCHITECTURES,
                   help=f"write the original layout: {', '.join(ARCHITECTURES)}")  # fmt: skip
    p.add_argument("--fp16", action="store_true", help="store float16 weights")
    p.add_argument("--allow-pickle", action="store_true", help="load .ckpt/.bin/.pt files (can run code; needs torch)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)

    from sd_jax.errors import CheckpointError, SDJaxError
    from sd_jax.loading.export import OutputPathError, check_output

    src = pathlib.Path(args.model)
    try:
        check_output(args.out, folder=not args.single_file)
        if args.config_dir is not None and not pathlib.Path(args.config_dir).is_dir():
            raise OutputPathError(f"--config-dir {args.config_dir}: no such folder")
    except OutputPathError as e:
        _fail(e, EXIT_USAGE, args.debug)

    import numpy as np

    from sd_jax.convert.single_file import check_architecture
    from sd_jax.loading.diffusers import load_checkpoint
    from sd_jax.loading.export import save_checkpoint
    from sd_jax.loading.single_file import load_single_file, save_single_file

    try:
        if src.is_file():
            ckpt = load_single_file(src, config_dir=args.config_dir, allow_pickle=args.allow_pickle)
        else:
            ckpt = load_checkpoint(args.model, allow_pickle=args.allow_pickle)
    except CheckpointError as e:
        _fail(e, EXIT_USAGE if isinstance(e, FileNotFoundError) else EXIT_RUNTIME, args.debug)
    except (SDJaxError, ValueError, OSError, ImportError) as e:
        _fail(e, EXIT_RUNTIME, args.debug)
    try:
        if args.single_file:
            names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in ckpt.models]
            check_architecture(args.single_file, {n: ckpt.config(n).to_diffusers_config() for n in names})
            out = save_single_file(args.out, ckpt, args.single_file)
        else:
            out = save_checkpoint(args.out, ckpt, dtype=np.float16 if args.fp16 else None)
    except CheckpointError as e:  # an architecture the layout cannot hold: a usage error
        _fail(e, EXIT_USAGE, args.debug)
    except (SDJaxError, ValueError, OSError) as e:
        _fail(e, EXIT_RUNTIME, args.debug)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
