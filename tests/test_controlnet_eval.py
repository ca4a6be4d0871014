"""The shapes ControlNet evaluation: its region/IoU measure on data-set images, and a run on the tiny fixture."""

import numpy as np
from conftest import FIXTURES

from sd_jax.data import control, shapes
from sd_jax.evaluation import controlnet_eval as ev
from sd_jax.evaluation.oracle import region


def test_region_of_a_data_set_image_is_its_silhouette():
    ious = []
    for i in range(50):
        ex = shapes.example("test", i)
        img = ex["image"].astype(np.float32) / 127.5 - 1
        mask = control.silhouette(img, shapes.PALETTE[shapes.COLORS[ex["background"]]])[..., 0] > 0.5
        ious.append(ev.iou(region(ex["image"]), mask))
    assert min(ious) > 0.95
    assert ev.iou(np.ones((4, 4), bool), np.zeros((4, 4), bool)) == 0.0


def test_control_images_are_the_named_shape_where_the_rng_puts_it():
    a, b = ev.control_image("circle", 3, 0), ev.control_image("circle", 3, 1)
    assert a.shape == (64, 64, 3) and np.array_equal(a[..., 0], a[..., 2])  # white on black: grey
    lo, hi = shapes.SIZE_RANGE
    area = (a[..., 0] > 0.5).mean()  # a circle of diameter size: pi/4 size^2
    assert np.pi / 4 * lo**2 * 0.9 < area < np.pi / 4 * hi**2 * 1.1
    black = np.float32(shapes.PALETTE["black"][0] / 255)
    assert np.isclose(a[0, 0, 0], black) or np.isclose(a[-1, -1, 0], black)  # the background is the palette's black
    assert ev.iou(a[..., 0] > 0.5, b[..., 0] > 0.5) < 0.9  # two placements
    from sd_jax.evaluation.oracle import classify

    img = (np.where(a > 0.5, 1.0, 0.0) * 255).astype(np.uint8)
    assert classify(img)[0] == shapes.SHAPES.index("circle")


def test_evaluate_runs_on_the_tiny_fixture():
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.load(FIXTURES / "sd1")
    pipe.load_controlnet(FIXTURES / "controlnet" / "sd1")
    res, data = ev.evaluate(pipe, seeds=1, controls_per_combo=1, combos=shapes.ALL_COMBINATIONS[:3], steps=2,
                            batch=4, log=lambda s: None)  # fmt: skip
    assert res["n"] == 3 and 0.0 <= res["iou_mean"] <= 1.0 and res["conflict"]["n"] == 3
    assert data["images"].shape == (1, 3, 64, 64, 3)
    assert "| images with IoU" in ev.markdown({**res, "model": "m", "controlnet": "c", "steps": 2, "sampler": "euler",
                                               "guidance_scale": 7.5, "seeds": 1})  # fmt: skip
