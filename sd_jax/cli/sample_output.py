"""Where sample.py's files go: ``NNNNN-SEED.png`` numbered after the folder's existing files (as A1111
numbers them), each with its parameters as PNG text; a grid, the progression strip and the GIF beside them.

Every file is written under a temporary name and renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np

NUMBERED = re.compile(r"^(\d{5,})-")
GRID_MAX = 100  # a contact sheet of more images would be enormous; beyond this, none is written


def next_index(out_dir: pathlib.Path) -> int:
    """One past the highest ``NNNNN-`` number in the folder (0 for a new or empty folder)."""
    if not out_dir.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def _save_png(img: np.ndarray, path: pathlib.Path, meta: dict | None = None) -> pathlib.Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = None
    if meta is not None:
        info = PngInfo()
        info.add_text("parameters", json.dumps(meta))
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(img).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


class Writer:
    """Numbers and writes a run's images as they come, batch by batch."""

    def __init__(self, out_dir: os.PathLike | str, meta: dict):
        self.out_dir = pathlib.Path(out_dir)
        self.meta = meta  # what every image shares
        self.first = self.next = next_index(self.out_dir)
        self.paths: list[pathlib.Path] = []
        self.kept: list[np.ndarray] = []  # for the grid, while there are at most GRID_MAX

    def add(self, imgs, prompts, **meta) -> list[pathlib.Path]:
        """One batch: ``imgs`` [N, H, W, 3] in [0, 1], ``prompts`` [N], ``meta`` (seed, ...) shared by the batch."""
        from sd_jax.pipelines import images

        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for i, img in enumerate(images.to_uint8(imgs)):
            m = {**self.meta, "prompt": prompts[i], **meta, "index": i}
            out.append(_save_png(img, self.out_dir / f"{self.next:05d}-{m['seed']}.png", m))
            self.next += 1
            if len(self.paths) + len(out) <= GRID_MAX:
                self.kept.append(np.asarray(imgs[i]))
        self.paths += out
        return out

    def extra(self, name: str) -> pathlib.Path:
        """A path for a side file of this run (``NNNNN-name``, numbered with its first image)."""
        return self.out_dir / f"{self.first:05d}-{name}"

    def save_image(self, img, name: str) -> pathlib.Path:
        from sd_jax.pipelines import images

        self.out_dir.mkdir(parents=True, exist_ok=True)
        return _save_png(images.to_uint8(img), self.extra(name))

    def grid(self) -> pathlib.Path | None:
        """A contact sheet of the run's images, when there are 2 to GRID_MAX of the same size."""
        from sd_jax.pipelines import images

        if not 1 < len(self.paths) <= GRID_MAX or len({a.shape for a in self.kept}) != 1:
            return None
        rows = int(np.ceil(np.sqrt(len(self.kept))))
        return self.save_image(images.make_grid(np.stack(self.kept), rows), "grid.png")

    def gif(self, frames) -> pathlib.Path:
        from sd_jax.pipelines import images

        path = self.extra("interpolate.gif")
        tmp = path.with_name(f".{path.name}.tmp.gif")
        images.save_gif(frames, tmp)
        os.replace(tmp, path)
        return path
