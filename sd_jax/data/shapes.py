"""The "shapes" data set: one filled circle, square or triangle on a uniform background, generated from a seed.

The data set of the embedded default model. Each 64x64 RGB image holds one shape whose bounding box
is 35-65% of the image side, placed fully inside the frame, in one of 8 palette colours on a background
of another palette colour, drawn 4x larger and box-downsampled (slight antialiasing, no other noise).
Captions read ``a {color} {shape} on a {background} background``: 3 x 8 x 7 = 168 combinations.

``HELD_OUT`` lists 12 combinations that never appear in the ``train`` split; each of their words still
appears in training in other combinations. They measure compositional generalization (``heldout`` split).

Example ``i`` of a split is a pure function of (split seed, i), so the builder, the tests and the
evaluation all see the same pictures.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 64
SIZE_RANGE = (0.35, 0.65)  # bounding-box side, as a fraction of the image side
_SUPERSAMPLE = 4

# (shape, colour, background): never in the train split. Every shape, colour and background word of these
# still appears in training (checked by tests/test_shapes.py).
HELD_OUT = (
    ("circle", "red", "green"),
    ("circle", "blue", "yellow"),
    ("circle", "white", "purple"),
    ("circle", "orange", "black"),
    ("square", "green", "red"),
    ("square", "yellow", "blue"),
    ("square", "purple", "white"),
    ("square", "black", "orange"),
    ("triangle", "red", "white"),
    ("triangle", "purple", "yellow"),
    ("triangle", "orange", "blue"),
    ("triangle", "black", "green"),
)

ALL_COMBINATIONS = tuple((s, c, b) for s, c, b in itertools.product(SHAPES, COLORS, COLORS) if c != b)
SEEN = tuple(x for x in ALL_COMBINATIONS if x not in HELD_OUT)

# split -> (seed, combinations it draws from)
SPLITS = {"train": (0, SEEN), "test": (1, SEEN), "heldout": (2, HELD_OUT)}


def caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def draw(shape: str, color: str, background: str, size: float, x: float, y: float, image_size=IMAGE_SIZE):
    """The picture as uint8 HWC: a shape whose bounding box has side ``size`` px and top-left ``(x, y)``."""
    k = _SUPERSAMPLE
    img = Image.new("RGB", (image_size * k, image_size * k), PALETTE[background])
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = x * k, y * k, (x + size) * k - 1, (y + size) * k - 1
    fill = PALETTE[color]
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":  # apex up, base along the bottom of the box
        d.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(img.resize((image_size, image_size), Image.BOX))


def example(split: str, index: int, image_size: int = IMAGE_SIZE) -> dict:
    """Example ``index`` of ``split``: image (uint8 HWC), caption and labels, a pure function of both."""
    seed, combos = SPLITS[split]
    rng = np.random.default_rng([seed, index])
    shape, color, background = combos[rng.integers(len(combos))]
    size = rng.uniform(*SIZE_RANGE) * image_size
    x, y = rng.uniform(0, image_size - size, size=2)
    return {
        "image": draw(shape, color, background, size, x, y, image_size),
        "text": caption(shape, color, background),
        "shape": SHAPES.index(shape),
        "color": COLORS.index(color),
        "background": COLORS.index(background),
    }


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def builder(data_dir, *, num_train: int = 50_000, num_test: int = 2_000, num_heldout: int = 2_000):
    """The TFDS builder (``array_record`` files, read with grain; no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Filled shapes on uniform backgrounds with captions; see ``sd_jax.data.shapes``."""

        VERSION = tfds.core.Version("1.0.0")
        sizes = {"train": num_train, "test": num_test, "heldout": num_heldout}

        def _info(self):
            f = tfds.features
            return self.dataset_info_from_configs(
                features=f.FeaturesDict(
                    {
                        "image": f.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                        "text": f.Text(),
                        "shape": f.ClassLabel(names=SHAPES),
                        "color": f.ClassLabel(names=COLORS),
                        "background": f.ClassLabel(names=COLORS),
                    }
                ),
                supervised_keys=("image", "text"),
            )

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(name, n) for name, n in self.sizes.items()}

        def _generate_examples(self, split, n):
            for i in range(n):
                ex = example(split, i)
                yield i, {**ex, "image": _png(ex["image"])}

    # The sizes are part of the data set's identity: a different count is a different folder.
    Shapes.name = f"shapes_{num_train}"
    return Shapes(data_dir=str(data_dir), file_format="array_record")


def prepare(data_dir, **sizes):
    """Generate (once) and return the builder; later calls reuse the prepared files."""
    b = builder(data_dir, **sizes)
    b.download_and_prepare()
    return b
