"""TFDS data: the image folder builder (both layouts) -> array_record -> grain batches; any prepared image dataset
with a text or label feature; corrupt images skipped and counted; disjoint host shards; exact resume; the cache."""

import json
import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs.tiny import get_config
from sd_jax.cli.cache import cache_from_config
from sd_jax.data import make_source, schema
from sd_jax.data.cache import CachedSource, build_cache
from sd_jax.data.folder import CaptionedImageFolder, ImageFolderError, prepare_folder, scan_folder
from sd_jax.data.tfds import TfdsSource
from sd_jax.tokenizer import load_tokenizer, tokenize
from sd_jax.training import loop
from sd_jax.training.model import ModelView, build
from sd_jax.training.trainers.diffusion import diffusion_loss

COLORS = {"red": (220, 30, 30), "green": (30, 200, 50), "blue": (30, 50, 220), "white": (240, 240, 240)}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_folder(root, layout, n=8, corrupt=0):
    """n solid-colour images of varying sizes and formats, captioned by colour; ``corrupt`` extra broken files."""
    root.mkdir(parents=True)
    names, meta = list(COLORS), []
    for i in range(n):
        color = names[i % len(names)]
        img = Image.new("RGB" if i % 3 else "L", (40 + 4 * i, 36), COLORS[color] if i % 3 else 128)
        fname = f"img{i:02d}.{'jpg' if i % 2 else 'png'}"
        img.save(root / fname)
        caption = f"a {color} square" if i % 3 else "a gray square"
        meta.append({"file_name": fname, "text": caption})
        if layout == "txt":
            (root / fname).with_suffix(".txt").write_text(caption + "\n")
    for k in range(corrupt):
        fname = f"broken{k}.png"
        (root / fname).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        meta.append({"file_name": fname, "text": "broken"})
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    return {m["file_name"]: m["text"] for m in meta}


def data_cfg(**kw):
    c = get_config().data
    c.unlock()
    c.update({"image_size": 16, "caption_dropout": 0.0, "random_flip": False, "workers": 2, **kw})
    return c


def decode(tok, ids):
    return [tok.decode([t for t in row if t not in (49406, 49407)]).strip() for row in ids]


@pytest.mark.parametrize("layout", ["jsonl", "txt"])
def test_folder_layouts_prepare_to_array_record_and_batch(tmp_path, tok, layout):
    captions = write_folder(tmp_path / "imgs", layout)
    builder = prepare_folder(tmp_path / "imgs", tmp_path / "tfds")
    assert list(builder.data_path.glob("*.array_record-*")), "not prepared as array_record"
    assert builder.info.splits["train"].num_examples == 8
    src = TfdsSource(builder, data_cfg(), tok)
    b = src.batch(0, 8)
    assert b["images"].shape == (8, 16, 16, 3) and b["images"].dtype == np.float32
    assert b["input_ids"].shape == (8, 77) and b["input_ids"].dtype == np.int32
    assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
    # one epoch of a one-host shard is a permutation of the records; each image carries its own caption
    records = src.records
    seen = sorted(int(src.order[p]) for p in range(8))
    assert seen == list(range(8))
    for k, text in enumerate(decode(tok, b["input_ids"])):
        rec = records[int(src.order[k])]
        assert text == captions[rec["file_name"].decode()]
        colour = text.split()[1]
        want = np.array(COLORS[colour]) / 127.5 - 1 if colour in COLORS else np.full(3, 128 / 127.5 - 1)
        np.testing.assert_allclose(b["images"][k].mean((0, 1)), want, atol=0.02)
    # prepared once: a second call reuses it (same config name), a changed folder gets a new one
    again = prepare_folder(tmp_path / "imgs", tmp_path / "tfds")
    assert again.data_path == builder.data_path
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "extra.png")
    if layout == "txt":
        assert prepare_folder(tmp_path / "imgs", tmp_path / "tfds").data_path != builder.data_path


@pytest.mark.parametrize("n,corrupt,words", [(0, 0, "no images"), (0, 2, "none of its 2 image file(s) can be read")])
def test_folder_with_nothing_readable_is_refused_before_tfds_writes(tmp_path, n, corrupt, words):
    write_folder(tmp_path / "imgs", "txt", n=n, corrupt=corrupt)
    with pytest.raises(ImageFolderError, match=re.escape(words)):
        prepare_folder(tmp_path / "imgs", tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))


def test_corrupt_images_are_skipped_at_prepare_and_read(tmp_path, tok):
    write_folder(tmp_path / "imgs", "jsonl", n=4, corrupt=2)
    (tmp_path / "imgs" / "metadata.jsonl").open("a").write(json.dumps({"file_name": "missing.png", "text": "x"}))
    builder = prepare_folder(tmp_path / "imgs", tmp_path / "tfds")
    assert builder.info.splits["train"].num_examples == 4
    assert sorted(builder.info.metadata["skipped"]) == ["broken0.png", "broken1.png", "missing.png"]
    reopened = tfds.builder_from_directory(str(builder.data_path))
    assert sorted(reopened.info.metadata["skipped"]) == ["broken0.png", "broken1.png", "missing.png"]

    # A record that goes bad after preparation (bit rot, a foreign dataset) is skipped at read time, and counted;
    # the refill is deterministic.
    class Rotten(TfdsSource):
        def _load(self, idx, rng):
            return None if idx == 2 else super()._load(idx, rng)

    def expected_skips(src, bad):  # every attempt that lands on the bad record is skipped and counted
        return sum(next(k for k, (i, _) in enumerate(src.slot_attempts(0, 8, j)) if i != bad) for j in range(8))

    src = Rotten(builder, data_cfg(), tok)
    assert src.prepared_skipped == 3  # reported in metrics.jsonl's skipped_images with the read-time skips
    assert TfdsSource(reopened, data_cfg(), tok).prepared_skipped == 3
    b1 = src.batch(0, 8)
    assert src.skipped == expected_skips(src, 2) >= 2 and b1["images"].shape == (8, 16, 16, 3)  # 2 epochs of 4
    np.testing.assert_array_equal(Rotten(builder, data_cfg(), tok).batch(0, 8)["images"], b1["images"])

    # the same through the real decoder: overwrite one stored image's bytes with garbage
    class Garbled(TfdsSource):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            good = self.records

            class View:
                def __len__(self):
                    return len(good)

                def __getitem__(self, i):
                    r = dict(good[i])
                    if i == 1:
                        r["image"] = b"\xff\xd8\xff garbage"
                    return r

            self.records = View()

    src = Garbled(builder, data_cfg(), tok)
    src.batch(0, 8)
    assert src.skipped == expected_skips(src, 1) >= 2


def test_two_hosts_read_disjoint_shards(tmp_path, tok):
    write_folder(tmp_path / "imgs", "jsonl", n=10)
    builder = prepare_folder(tmp_path / "imgs", tmp_path / "tfds")
    hosts = [TfdsSource(builder, data_cfg(), tok, process_index=i, process_count=2) for i in range(2)]
    shards = [{int(h.order[p]) for p in range(len(h))} for h in hosts]
    assert len(hosts[0]) == len(hosts[1]) == 5
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(10))
    # batches only ever draw from the host's own shard, over several epochs
    for h, shard in zip(hosts, shards):
        drawn = {int(h.order[p]) for p in range(0, 40)}
        assert drawn == shard
    b0, b1 = hosts[0].batch(3, 4), hosts[1].batch(3, 4)
    assert not np.array_equal(b0["images"], b1["images"])


def test_batches_are_a_function_of_seed_step_process(tmp_path, tok):
    write_folder(tmp_path / "imgs", "txt", n=6)
    builder = prepare_folder(tmp_path / "imgs", tmp_path / "tfds")
    cfg = data_cfg(random_flip=True, random_crop=True, caption_dropout=0.5)
    a, b = TfdsSource(builder, cfg, tok), TfdsSource(builder, cfg, tok)
    for step in (5, 0, 2):  # any order: no hidden iterator state
        x, y = a.batch(step, 4), b.batch(step, 4)
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    ids = np.concatenate([a.batch(s, 4)["input_ids"] for s in range(10)])
    empty = tokenize(tok, [""])[0]
    dropped = (ids == empty).all(1).mean()
    assert 0.3 < dropped < 0.7, dropped  # caption dropout for CFG
    cfg2 = data_cfg(random_flip=True, random_crop=True, caption_dropout=0.5, seed=1)
    assert not np.array_equal(TfdsSource(builder, cfg2, tok).batch(0, 4)["images"], a.batch(0, 4)["images"])


class TinyLabels(tfds.core.GeneratorBasedBuilder):
    """A registered labelled image dataset, prepared locally (stands in for e.g. imagenette; never downloaded)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "picture": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["red_fox", "blue_whale"]),
                }  # fmt: skip
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"picture": Image.new("RGB", (24, 24), COLORS[["red", "blue"][i % 2]]), "label": i % 2}


def test_registered_dataset_with_labels_by_name(tmp_path, tok):
    TinyLabels(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = data_cfg(source="tfds", tfds_name="tiny_labels", data_dir=str(tmp_path), split="test")
    src = make_source(cfg, tok)
    assert isinstance(src, TfdsSource) and src.image_key == "picture" and src.text_key == "label"
    b = src.batch(0, 2)
    texts = decode(tok, b["input_ids"])
    assert sorted(texts) == ["a photo of a blue whale", "a photo of a red fox"]
    for k, text in enumerate(texts):
        want = np.array(COLORS["red" if "fox" in text else "blue"]) / 127.5 - 1
        np.testing.assert_allclose(b["images"][k].mean((0, 1)), want, atol=0.02)
    with pytest.raises(ValueError, match="no feature 'caption'"):
        make_source(data_cfg(source="tfds", tfds_name="tiny_labels", data_dir=str(tmp_path), text_key="caption"), tok)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        make_source(data_cfg(source="tfds", tfds_name="tiny_labels", data_dir=str(tmp_path / "empty")), tok)


def test_folder_source_prepares_into_the_workdir(tmp_path, tok):
    write_folder(tmp_path / "imgs", "jsonl", n=4)
    src = make_source(data_cfg(source="folder", path=str(tmp_path / "imgs")), tok, workdir=tmp_path / "run")
    assert isinstance(src, TfdsSource)
    assert str(src.builder.data_path).startswith(str(tmp_path / "run" / "tfds" / "captioned_image_folder"))
    assert len(scan_folder(tmp_path / "imgs")) == 4 and CaptionedImageFolder.name == "captioned_image_folder"


def small_train_config(folder, **kw):
    c = get_config()
    c.unlock()
    c.batch_size, c.log_every, c.checkpoint_every = 8, 1, 2
    c.optim.lr = 1e-4
    c.data.update(dict(source="folder", path=str(folder), image_size=32, workers=2))
    c.update(kw)
    return c


@pytest.mark.slow  # 9 min on 2 cores; test_training.py::test_resume_is_exact covers the loop in CI
def test_resume_is_exact_with_a_folder(tmp_path):
    write_folder(tmp_path / "imgs", "jsonl", n=12, corrupt=1)
    cfg = small_train_config(tmp_path / "imgs", steps=4)
    cfg.data.random_crop = True
    whole = loop.run(cfg, tmp_path / "a", log=lambda s: None)
    loop.train(cfg, tmp_path / "b", log=lambda s: None, stop_at=2)
    resumed = loop.run(cfg, tmp_path / "b", log=lambda s: None)
    assert resumed.metrics["step"] == 4
    diff = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                        jax.device_get(whole.state), jax.device_get(resumed.state))  # fmt: skip
    assert max(jax.tree.leaves(diff)) == 0.0


@pytest.mark.slow  # two trainers and a cache build, ~6 min on 2 cores; the cache's build is checked in the default run
def test_latent_cache_gives_the_same_loss(tmp_path, tok):
    write_folder(tmp_path / "imgs", "jsonl", n=6, corrupt=1)
    cfg = small_train_config(tmp_path / "imgs", steps=2)
    cfg.data.random_flip, cfg.data.caption_dropout = True, 0.5
    cache_from_config(cfg, tmp_path / "cache", workdir=tmp_path / "run", batch_size=4, log=lambda s: None)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["skipped"] == 0 and meta["flip"]  # the broken file never made it into the prepared dataset

    comps, params = build(cfg)
    pixels = make_source(cfg.data, tok, workdir=tmp_path / "run")
    cached = CachedSource(pixels, tmp_path / "cache")
    cached.check_models(ModelView(comps, params), cfg)
    loss = jax.jit(lambda batch, key: diffusion_loss(comps, cfg, params, batch, key, ("unet",))[0])
    for step in range(3):
        bp, bc = pixels.batch(step, 8), cached.batch(step, 8)
        assert set(bc) == {"latent_mean", "latent_logvar", "context"}
        assert schema.kind(bc) == schema.LATENTS and schema.kind(bp) == schema.PIXELS and schema.has_latents(bc)
        key = jax.random.key(step)  # the trainer's per-step key: same posterior sample, timesteps and noise
        lp, lc = float(loss(bp, key)), float(loss(bc, key))
        print("step", step, "loss from pixels", lp, "from cache", lc)
        assert abs(lp - lc) <= 1e-5 * max(1.0, abs(lp))

    # a cache is refused for other weights or another dataset configuration
    other = small_train_config(tmp_path / "imgs", seed=1)
    other.data.random_flip, other.data.caption_dropout = True, 0.5
    with pytest.raises(ValueError, match="other VAE/text encoder weights"):
        cached.check_models(ModelView(*build(other)), other)
    cfg.data.random_flip = False
    with pytest.raises(ValueError, match="cache was built for"):
        CachedSource(make_source(cfg.data, tok, workdir=tmp_path / "run"), tmp_path / "cache")


@pytest.mark.slow  # a whole run from the cache; test_latent_cache_gives_the_same_loss checks it in CI
def test_training_from_the_cache_runs(tmp_path):
    write_folder(tmp_path / "imgs", "txt", n=6)
    cfg = small_train_config(tmp_path / "imgs", steps=2)
    cache_from_config(cfg, tmp_path / "cache", workdir=tmp_path / "run", log=lambda s: None)
    cfg.data.cache = str(tmp_path / "cache")
    m = loop.train(cfg, tmp_path / "run", log=lambda s: None)
    assert m["step"] == 2 and np.isfinite(m["loss"])


def test_build_cache_takes_encode_functions(tmp_path, tok):
    """The cache builder knows no models: any encoders do. With a 2x subsampling "VAE" and ids as "embeddings", the
    cached batches are the pixel batches (records, flips, caption dropout and skips in the same order)."""
    write_folder(tmp_path / "imgs", "jsonl", n=5)
    cfg = data_cfg(source="folder", path=str(tmp_path / "imgs"), random_flip=True, caption_dropout=0.5)
    pixels = make_source(cfg, tok, workdir=tmp_path / "run")
    calls = []

    def encode_images(x):
        calls.append(x.shape)
        return x[:, ::2, ::2], np.zeros_like(x[:, ::2, ::2])

    encode_text = lambda ids: ids[..., None].astype(np.float32)  # noqa: E731
    build_cache(pixels, encode_images, encode_text, tmp_path / "cache", weights="w", batch_size=2, log=lambda s: None)
    assert calls == [(4, 16, 16, 3)] * 3  # both flips of every padded batch of 2
    cached = CachedSource(pixels, tmp_path / "cache")
    assert cached.meta["weights"] == "w" and cached.meta["skipped"] == 0
    for step in range(3):
        bp, bc = pixels.batch(step, 4), cached.batch(step, 4)
        np.testing.assert_array_equal(bc["latent_mean"], bp["images"][:, ::2, ::2])
        np.testing.assert_array_equal(bc["context"][..., 0], bp["input_ids"])
    pixels.check_models(None, None)  # every source has the hook (no hasattr): pixel sources accept any models


def test_batch_schema_names_what_a_batch_lacks():
    ids = np.zeros((2, 77), np.int32)
    assert schema.kind(schema.pixels(np.zeros((2, 4, 4, 3)), ids, prior_mask=[0, 1])) == schema.PIXELS
    assert schema.pixels(np.zeros((2, 4, 4, 3)), ids)["images"].dtype == np.float32
    with pytest.raises(schema.BatchError, match=r"missing \['input_ids'\]"):
        schema.kind({"images": np.zeros((2, 4, 4, 3))})
    with pytest.raises(schema.BatchError, match=r"not allowed \['images'\]"):
        schema.kind({**schema.latents(np.zeros((2, 2, 2, 4)), np.zeros((2, 2, 2, 4)), np.zeros((2, 77, 8))),
                     "images": np.zeros((2, 4, 4, 3))})  # fmt: skip
