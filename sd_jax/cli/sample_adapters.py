"""sample.py's textual-inversion and IP-Adapter flags: ``--embedding PATH[:TOKEN]`` (repeatable),
``--ip-adapter FILE --ip-image IMG [--ip-scale S] [--ip-image-encoder DIR]``. Checked before any model loads;
applied to the loaded pipeline by :func:`apply`."""

from __future__ import annotations

import pathlib

import numpy as np

from sd_jax.cli.sample_args import UsageError


def add_flags(parser) -> None:
    g = parser.add_argument_group("textual inversion and IP-Adapter")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="a textual-inversion embedding (A1111 .safetensors/.pt, SDXL clip_l/clip_g, diffusers "
                        "learned_embeds); the token is the file's stem unless given; repeatable")  # fmt: skip
    g.add_argument("--ip-adapter", help="an IP-Adapter .safetensors (h94 layout; image_encoder/ beside it)")
    g.add_argument("--ip-image", help="the image prompt for --ip-adapter")
    g.add_argument("--ip-scale", type=float, default=0.6, help="weight of the image prompt (default 0.6)")
    g.add_argument("--ip-image-encoder", help="CLIP image encoder folder (default: image_encoder/ beside the file)")


def check(args, modes_with_text: bool) -> None:
    for spec in args.embedding:
        path = spec if pathlib.Path(spec).exists() else spec.rpartition(":")[0]
        if not path or not pathlib.Path(path).exists():
            raise UsageError(f"--embedding {spec}: no such file ; give an embedding file, optionally PATH:TOKEN")
    if bool(args.ip_adapter) != bool(args.ip_image):
        given, missing = ("--ip-adapter", "--ip-image") if args.ip_adapter else ("--ip-image", "--ip-adapter")
        raise UsageError(f"{given} needs {missing} ; give both (the adapter file and the image prompt)")
    if args.ip_adapter:
        if not modes_with_text:
            raise UsageError("--ip-adapter works with txt2img, img2img and inpaint ; drop it for this mode")
        for flag, value in (("--ip-adapter", args.ip_adapter), ("--ip-image", args.ip_image)):
            if not pathlib.Path(value).is_file():
                raise UsageError(f"{flag} {value}: no such file")
        if args.ip_image_encoder and not (pathlib.Path(args.ip_image_encoder) / "config.json").is_file():
            raise UsageError(f"--ip-image-encoder {args.ip_image_encoder}: no config.json there ; pass the "
                             "CLIPVisionModelWithProjection folder")  # fmt: skip
        if not np.isfinite(args.ip_scale):
            raise UsageError(f"--ip-scale {args.ip_scale}: not a finite number")
        try:
            from PIL import Image

            with Image.open(args.ip_image) as im:
                im.verify()
        except Exception as e:
            raise UsageError(f"--ip-image {args.ip_image}: not a readable image ({str(e).splitlines()[0]})") from None


def apply(pipe, args) -> dict:
    """Load the embeddings and the adapter into ``pipe``; returns the mode arguments and metadata to record."""
    meta, kwargs = {}, {}
    if args.embedding:
        tokens = pipe.load_textual_inversion(args.embedding, allow_pickle=args.allow_pickle)
        meta["embeddings"] = [str(s) for s in args.embedding]
        print(f"textual inversion: added {tokens}")
    if args.ip_adapter:
        from PIL import Image

        pipe.load_ip_adapter(args.ip_adapter, args.ip_image_encoder, scale=args.ip_scale,
                             allow_pickle=args.allow_pickle)  # fmt: skip
        with Image.open(args.ip_image) as im:
            kwargs["ip_adapter_image"] = np.asarray(im.convert("RGB"), np.float32) / 255.0
        meta.update(ip_adapter=str(args.ip_adapter), ip_image=str(args.ip_image), ip_scale=args.ip_scale)
    return {"kwargs": kwargs, "meta": meta}
