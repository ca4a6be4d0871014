"""Training logs: TensorBoard event files, a progress bar, metrics.jsonl and sample grids from the in-memory EMA."""

import json
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from configs.tiny import get_config
from sd_jax.training import loop


def read_events(tb_dir):
    """(tag, step, kind) of every summary value in a TensorBoard event file (TFRecord framing)."""
    out = []
    for path in tb_dir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.append((v.tag, ev.step, v.WhichOneof("value"), v))
    return out


def test_tiny_run_writes_tensorboard_samples_and_progress(tmp_path, capsys):
    c = get_config()
    c.unlock()
    c.steps, c.batch_size, c.log_every, c.sample_every, c.sample_steps = 2, 8, 1, 2, 2
    c.sample_prompts = ("a red picture", "a blue picture", "a green picture")
    c.optim.ema_decay = 0.5  # so the EMA visibly differs from the initial weights
    m = loop.train(c, tmp_path)
    assert m["step"] == 2

    # samples: a PNG grid (2 rows x 2 columns of 32px images for 3 prompts) and a TensorBoard image
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_2.png"))
    assert grid.shape == (64, 64, 3) and grid.std() > 0

    events = read_events(tmp_path / "tb")
    scalars = {(tag, step): v.simple_value for tag, step, kind, v in events if kind == "simple_value"}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        for k in ("loss", "lr", "grad_norm", "images_per_s", "step_time", "skipped_images"):
            assert np.isclose(scalars[(f"train/{k}", x["step"])], x[k], rtol=1e-6), k
    images = [(tag, step, v) for tag, step, kind, v in events if kind == "image"]
    assert [(t, s) for t, s, _ in images] == [("samples", 2)]
    assert (images[0][2].image.height, images[0][2].image.width) == (64, 64)

    # the console: a progress bar with loss, lr, grad norm, images/s and step time, and the log lines
    console = capsys.readouterr()  # the bar on stderr, log lines above it on stdout (tqdm.write)
    for field in ("loss=", "lr=", "grad_norm=", "img/s=", "ms/step=", "2/2"):
        assert field in console.err, field
    assert "[2/2] loss" in console.out and "samples:" in console.out

    # the grid is what the exported EMA weights sample with the same settings
    from sd_jax.pipelines.images import make_grid, to_uint8
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.load(loop.export(c, tmp_path, tmp_path / "export"), safety_checker=False)
    images, _ = pipe.txt2img(list(c.sample_prompts), height=32, width=32, steps=2, guidance_scale=7.5, seed=0)
    expect = to_uint8(make_grid(images, rows=2))
    assert np.abs(expect.astype(int) - grid.astype(int)).max() <= 1


@pytest.mark.slow  # a whole run (100 s on 2 cores) for a default
def test_sampling_off_by_default(tmp_path):
    c = get_config()
    c.unlock()
    c.steps, c.batch_size, c.log_every = 1, 8, 1
    assert c.sample_every == 0
    loop.train(c, tmp_path, log=lambda s: None)
    assert not (tmp_path / "samples").exists() and list((tmp_path / "tb").glob("events.out.tfevents.*"))
