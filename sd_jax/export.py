"""``python -m sd_jax.export``: convert any checkpoint we load into a diffusers folder (or a single file).

python -m sd_jax.export --model model.safetensors --out my_model/           # single file -> diffusers
python -m sd_jax.export --model my_model/ --out model.safetensors --single-file sd1
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sd_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers folder, single file or Hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--config-dir", default=None, help="configs for a single file whose architecture does not ship")
    p.add_argument(
        "--single-file",
        metavar="ARCH",
        default=None,
        help="write the original layout: sd1, sd1_inpaint, sd2, sd2_inpaint, sdxl or x4_upscaler",
    )
    p.add_argument("--fp16", action="store_true", help="store float16 weights")
    p.add_argument("--allow-pickle", action="store_true")
    args = p.parse_args(argv)

    import numpy as np

    from sd_jax.errors import SDJaxError
    from sd_jax.loading.diffusers import load_checkpoint
    from sd_jax.loading.export import save_checkpoint
    from sd_jax.loading.single_file import load_single_file, save_single_file

    try:
        src = pathlib.Path(args.model)
        if src.is_file():
            ckpt = load_single_file(src, config_dir=args.config_dir, allow_pickle=args.allow_pickle)
        else:
            ckpt = load_checkpoint(args.model, allow_pickle=args.allow_pickle)
        if args.single_file:
            out = save_single_file(args.out, ckpt, args.single_file)
        else:
            out = save_checkpoint(args.out, ckpt, dtype=np.float16 if args.fp16 else None)
    except (SDJaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
