"""Where sample.py's files go: ``NNNNN-SEED.png`` numbered after the folder's existing files (as A1111 numbers
them), each with its generation parameters as A1111 infotext (:mod:`sd_jax.infotext`); a grid, the progression
strip and the GIF beside them, each with the parameters of the first image.

``--format png`` keeps the text in the PNG ``parameters`` chunk; ``jpeg`` and ``webp`` in the EXIF UserComment
(:func:`sd_jax.pnginfo.write_exif`, as A1111 writes it with piexif); a GIF in its comment extension.
Every file is written under a temporary name and renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np

NUMBERED = re.compile(r"^(\d{5,})-")
GRID_MAX = 100  # a contact sheet of more images would be enormous; beyond this, none is written
FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp")}
QUALITY = 95  # JPEG / WebP


def next_index(out_dir: pathlib.Path) -> int:
    """One past the highest ``NNNNN-`` number in the folder (0 for a new or empty folder)."""
    if not out_dir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def write_image(img: np.ndarray, fp, text: str | None = None, fmt: str = "png") -> None:
    """``img`` uint8 [H, W, 3] to the file or file object ``fp`` in ``fmt``, with the infotext ``text`` (None:
    none): the one encoder of sample.py's files and the server's base64 images."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from sd_jax.pnginfo import write_exif

    kind = FORMATS[fmt][0]
    kw = {}
    if kind == "PNG" and text is not None:
        kw["pnginfo"] = PngInfo()
        kw["pnginfo"].add_text("parameters", text)
    elif kind != "PNG":
        kw["quality"] = QUALITY
        if text is not None:
            kw["exif"] = write_exif(text)
    Image.fromarray(img).save(fp, format=kind, **kw)


def save_image(img: np.ndarray, path: pathlib.Path, text: str | None = None, fmt: str = "png") -> pathlib.Path:
    """``img`` uint8 [H, W, 3] to ``path`` in ``fmt``, with the infotext ``text`` (None: none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_image(img, tmp, text, fmt)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Writer:
    """Numbers and writes a run's images as they come, batch by batch."""

    def __init__(self, out_dir: os.PathLike | str, fmt: str = "png"):
        self.out_dir = pathlib.Path(out_dir)
        self.fmt, self.ext = fmt, FORMATS[fmt][1]
        self.first = self.next = next_index(self.out_dir)
        self.paths: list[pathlib.Path] = []
        self.texts: list[str] = []
        self.kept: list[np.ndarray] = []  # for the grid, while there are at most GRID_MAX

    def add(self, imgs, texts: list[str], seeds: list[int]) -> list[pathlib.Path]:
        """One batch: ``imgs`` [N, H, W, 3] in [0, 1], each image's infotext and seed (for its file name)."""
        from sd_jax.pipelines import images

        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for img, text, seed in zip(images.to_uint8(imgs), texts, seeds, strict=True):
            out.append(save_image(img, self.out_dir / f"{self.next:05d}-{seed}.{self.ext}", text, self.fmt))
            self.next += 1
            if len(self.paths) + len(out) <= GRID_MAX:
                self.kept.append(np.asarray(img))
        self.paths += out
        self.texts += texts
        return out

    def extra(self, name: str) -> pathlib.Path:
        """A path for a side file of this run (``NNNNN-name``, numbered with its first image)."""
        return self.out_dir / f"{self.first:05d}-{name}"

    def save_image(self, img, name: str, text: str | None = None) -> pathlib.Path:
        """A side image (``name`` without extension) in the run's format; ``text``: its infotext (default: the
        first image's)."""
        from sd_jax.pipelines import images

        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = text if text is not None else (self.texts[0] if self.texts else None)
        return save_image(images.to_uint8(img), self.extra(f"{name}.{self.ext}"), text, self.fmt)

    def grid(self) -> pathlib.Path | None:
        """A contact sheet of the run's images, when there are 2 to GRID_MAX of the same size."""
        from sd_jax.pipelines import images

        if not 1 < len(self.paths) <= GRID_MAX or len({a.shape for a in self.kept}) != 1:
            return None
        rows = int(np.ceil(np.sqrt(len(self.kept))))
        return self.save_image(images.make_grid(np.stack(self.kept), rows), "grid")

    def gif(self, frames, text: str | None = None, duration_ms: int = 100) -> pathlib.Path:
        """The interpolation as a looping GIF; ``text`` goes in its comment extension (as A1111 saves GIFs)."""
        from PIL import Image

        from sd_jax.pipelines import images

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.extra("interpolate.gif")
        tmp = path.with_name(f".{path.name}.tmp.gif")
        pil = [Image.fromarray(f) for f in images.to_uint8(np.asarray(frames))]
        kw = {"comment": text.encode("utf-8")} if text else {}
        try:
            pil[0].save(tmp, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0, **kw)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
