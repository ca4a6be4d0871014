"""An analytic oracle for "shapes" pictures: background colour, foreground colour and shape class.

- background: the median colour of the image border, snapped to the nearest palette colour;
- foreground: the median of the pixels far from the background, snapped to the palette (never the background);
- shape: from the soft coverage ``alpha`` (each pixel's position between the two colours; antialiased edges
  count fractionally), the area over the bounding box: a square fills 1, a circle pi/4, a triangle 1/2.
  A square and a circle are also told apart by how full the box's corners are.

Validated on the data set's own images in tests/test_shapes.py (100% there).
"""

from __future__ import annotations

import numpy as np

from sd_jax.data.shapes import COLORS, PALETTE, SHAPES

_RGB = np.asarray([PALETTE[c] for c in COLORS], np.float32)


def _nearest(rgb, exclude: int | None = None) -> int:
    d = np.sum((_RGB - np.asarray(rgb, np.float32)) ** 2, axis=-1)
    if exclude is not None:
        d[exclude] = np.inf
    return int(np.argmin(d))


def classify(image: np.ndarray) -> tuple[int, int, int]:
    """``(shape, color, background)`` indices (into SHAPES, COLORS, COLORS) of a uint8 HWC picture."""
    img = np.asarray(image, np.float32)[..., :3]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])  # fmt: skip
    bg = _nearest(np.median(border, axis=0))
    far = np.linalg.norm(img - _RGB[bg], axis=-1) > 60.0
    if far.sum() < 4:  # no shape at all
        return -1, -1, bg
    fg = _nearest(np.median(img[far], axis=0), exclude=bg)
    direction = _RGB[fg] - _RGB[bg]
    alpha = np.clip((img - _RGB[bg]) @ direction / (direction @ direction), 0.0, 1.0)
    return _shape_of(alpha), fg, bg


def _shape_of(alpha: np.ndarray) -> int:
    rows = np.nonzero(alpha.max(axis=1) > 0.5)[0]  # rows/columns the shape covers at least half of a pixel
    cols = np.nonzero(alpha.max(axis=0) > 0.5)[0]
    if len(rows) < 2 or len(cols) < 2:
        return -1
    box = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fill = box.sum() / box.size
    if fill < 0.64:
        return SHAPES.index("triangle")
    h, w = box.shape
    ch, cw = max(1, h // 6), max(1, w // 6)
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    return SHAPES.index("square" if fill > 0.9 or corners > 0.7 else "circle")


def classify_batch(images) -> np.ndarray:
    """``[N, 3]`` (shape, color, background) for uint8 NHWC pictures."""
    return np.asarray([classify(im) for im in images], np.int64).reshape(-1, 3)


def region(image: np.ndarray) -> np.ndarray:
    """bool ``[H, W]``: the pixels at least half-way from the background colour to the shape's colour."""
    img = np.asarray(image, np.float32)[..., :3]
    shape, fg, bg = classify(image)
    if fg < 0:
        return np.zeros(img.shape[:2], bool)
    direction = _RGB[fg] - _RGB[bg]
    return (img - _RGB[bg]) @ direction / (direction @ direction) > 0.5
