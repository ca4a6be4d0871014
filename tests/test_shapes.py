"""The "shapes" data set (palette, geometry, held-out split, TFDS builder) and its analytic oracle."""

import numpy as np

from sd_jax.data import shapes
from sd_jax.evaluation.oracle import classify, classify_batch


def test_combinations_and_heldout():
    assert len(shapes.ALL_COMBINATIONS) == 168 and len(shapes.HELD_OUT) == 12 and len(shapes.SEEN) == 156
    assert set(shapes.HELD_OUT) <= set(shapes.ALL_COMBINATIONS)
    for shape, color, bg in shapes.HELD_OUT:  # every word of a held-out combination is seen in training
        assert any(s == shape for s, _, _ in shapes.SEEN)
        assert any(c == color for _, c, _ in shapes.SEEN)
        assert any(b == bg for _, _, b in shapes.SEEN)
    train = {(e["shape"], e["color"], e["background"]) for e in (shapes.example("train", i) for i in range(2000))}
    held = {(shapes.SHAPES.index(s), shapes.COLORS.index(c), shapes.COLORS.index(b)) for s, c, b in shapes.HELD_OUT}
    assert not train & held and len(train) == 156


def test_pictures_follow_the_spec():
    for i in range(200):
        ex = shapes.example("train", i)
        img = ex["image"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        fg = np.asarray(shapes.PALETTE[shapes.COLORS[ex["color"]]])
        bg = np.asarray(shapes.PALETTE[shapes.COLORS[ex["background"]]])
        assert ex["color"] != ex["background"]
        assert ex["text"] == shapes.caption(shapes.SHAPES[ex["shape"]], shapes.COLORS[ex["color"]],
                                            shapes.COLORS[ex["background"]])  # fmt: skip
        # only the two colours and their antialiased mixes: every pixel lies on the segment bg -> fg
        d = fg - bg
        a = np.clip((img - bg) @ d / (d @ d), 0, 1)
        assert np.abs(bg + a[..., None] * d - img).max() <= 2.5
        assert np.all(img[0] == bg) or np.all(img[:, 0] == bg) or np.all(img[-1] == bg) or np.all(img[:, -1] == bg)
        # the box side is 35-65% of the image side (coverage >= half a pixel)
        rows, cols = np.nonzero(a.max(1) > 0.5)[0], np.nonzero(a.max(0) > 0.5)[0]
        side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert 0.35 * 64 - 1.5 <= side <= 0.65 * 64 + 1.5
    np.testing.assert_array_equal(shapes.example("test", 5)["image"], shapes.example("test", 5)["image"])


def test_oracle_is_right_on_the_data():
    for split in ("train", "heldout"):
        exs = [shapes.example(split, i) for i in range(600)]
        pred = classify_batch(np.stack([e["image"] for e in exs]))
        true = np.asarray([(e["shape"], e["color"], e["background"]) for e in exs])
        assert np.all(pred == true), np.nonzero(np.any(pred != true, 1))


def test_oracle_rejects_an_empty_picture():
    blank = np.full((64, 64, 3), shapes.PALETTE["blue"], np.uint8)
    assert classify(blank)[:2] == (-1, -1)


def test_tfds_builder_writes_array_record(tmp_path):
    b = shapes.prepare(tmp_path, num_train=24, num_test=8, num_heldout=8)
    src = b.as_data_source()
    assert len(src["train"]) == 24 and len(src["heldout"]) == 8
    assert list((tmp_path / b.name / "1.0.0").glob("*.array_record*"))
    ex = src["heldout"][3]
    text = ex["text"].decode()
    s, c, bg = shapes.SHAPES[ex["shape"]], shapes.COLORS[ex["color"]], shapes.COLORS[ex["background"]]
    assert (s, c, bg) in shapes.HELD_OUT and text == shapes.caption(s, c, bg)
    want = [e for e in (shapes.example("heldout", i) for i in range(8)) if e["text"] == text]
    assert any(np.array_equal(ex["image"], w["image"]) for w in want)


def test_shapes_source_slices_the_global_batch(tmp_path):
    from configs.tiny import get_config
    from sd_jax.data import make_source
    from sd_jax.data.shapes_source import ShapesSource
    from sd_jax.tokenizer import load_tokenizer

    cfg = get_config().data
    cfg.unlock()
    cfg.update({"source": "shapes", "num_train": 24, "data_dir": str(tmp_path), "image_size": 64})
    src = make_source(cfg, load_tokenizer())
    assert isinstance(src, ShapesSource) and src.skipped == src.prepared_skipped == 0
    whole = src.batch(3, 4)
    assert whole["images"].shape == (4, 64, 64, 3) and whole["images"].dtype == np.float32
    for k in whole:  # two processes drawing their halves see the same examples as one drawing all
        halves = np.concatenate([src.batch(3, 2, offset=0)[k], src.batch(3, 2, offset=2)[k]])
        np.testing.assert_array_equal(halves, whole[k])
    train = [shapes.example("train", i)["image"] / 127.5 - 1.0 for i in range(24)]
    for img in whole["images"]:  # each is a training picture, maybe mirrored
        assert any(np.allclose(img, t, atol=1e-6) or np.allclose(img, t[:, ::-1], atol=1e-6) for t in train)
