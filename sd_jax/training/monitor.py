"""What a run reports: a console progress bar, log lines, ``metrics.jsonl``, TensorBoard and sample grids.

Everything is written by the main process only. TensorBoard event files go to ``WORKDIR/tb``
(``tensorboard --logdir WORKDIR/tb``), sample grids to ``WORKDIR/samples/step_N.png`` and to TensorBoard.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from PIL import Image


class Monitor:
    def __init__(self, cfg, workdir, start: int, *, log=None):
        self.cfg, self.workdir = cfg, pathlib.Path(workdir)
        self.is_main = jax.process_index() == 0
        self.bar = self.metrics_file = self.writer = None
        if self.is_main:
            from tensorboardX import SummaryWriter
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0,
                            disable=not cfg.get("progress_bar", True))  # fmt: skip
            self.metrics_file = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self.writer = SummaryWriter(str(self.workdir / "tb"))
        self.log = log or (self.bar.write if self.bar is not None else print)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, m: dict) -> None:
        """One log step: bar postfix, a console line, a metrics.jsonl line and TensorBoard scalars."""
        if not self.is_main:
            return
        step = m["step"]
        post = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}", "grad_norm": f"{m['grad_norm']:.3f}",
                "img/s": f"{m['images_per_s']:.1f}", "ms/step": f"{m['step_time'] * 1000:.0f}"}  # fmt: skip
        self.bar.set_postfix(post, refresh=False)
        known = {"step", "loss", "lr", "grad_norm", "images_per_s", "step_time"}
        extra = "".join(f" {k} {v:.4g}" for k, v in m.items() if k not in known and isinstance(v, (int, float)))
        self.log(f"[{step}/{self.cfg.steps}] loss {m['loss']:.4f} lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} "
                 f"{m['images_per_s']:.1f} img/s {m['step_time'] * 1000:.0f} ms/step{extra}")  # fmt: skip
        self.metrics_file.write(json.dumps(m) + "\n")
        self.metrics_file.flush()
        for k, v in m.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.flush()

    def samples(self, step: int, grid: np.ndarray | None) -> None:
        if not self.is_main or grid is None:
            return
        out = self.workdir / "samples" / f"step_{step}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(out)
        self.writer.add_image("samples", grid, step, dataformats="HWC")
        self.writer.flush()
        self.log(f"[{step}/{self.cfg.steps}] samples: {out}")

    def close(self) -> None:
        if self.is_main:
            self.bar.close()
            self.metrics_file.close()
            self.writer.close()
