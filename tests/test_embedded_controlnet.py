"""The shapes ControlNet shipped with the embedded model: sample.py with only --control-image and a prompt puts the
prompt's colours where the control's silhouette is."""

import numpy as np
from PIL import Image

from sd_jax.cli.sample import main
from sd_jax.data import shapes
from sd_jax.embedded import default_controlnet_path
from sd_jax.evaluation.controlnet_eval import iou
from sd_jax.evaluation.oracle import classify, region


def test_the_embedded_pair_follows_the_control(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_JAX_DEFAULT_MODEL", raising=False)
    assert default_controlnet_path() is not None
    mask = shapes.draw("square", "white", "black", 30, 6, 24)  # off-centre, lower left
    Image.fromarray(mask).save(tmp_path / "mask.png")
    main(["--control-image", str(tmp_path / "mask.png"), "--prompt", "a red square on a blue background",
          "--steps", "20", "--output-dir", str(tmp_path / "out")])  # fmt: skip
    (png,) = (tmp_path / "out").glob("00000-*.png")
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (64, 64, 3)
    shape, color, background = classify(img)
    assert (color, background) == (shapes.COLORS.index("red"), shapes.COLORS.index("blue"))
    assert iou(region(img), mask[..., 0] > 127) > 0.8
