"""Sample images during training: fixed prompts through the StableDiffusion pipeline, built from in-memory weights.

The pipeline is built once around the run's modules and reused, so the sampling loop compiles once;
each call swaps in the current weights (the EMA when there is one). Multi-host: every process must call
``render`` (sharded weights are gathered collectively); only the main process samples.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from sd_jax.pipelines.images import make_grid, to_uint8


class SampleRenderer:
    """Sample grids of ``cfg.sample_prompts`` from the run's :class:`~sd_jax.components.Components` (SD 1/2 and
    SDXL alike: the pipeline is :meth:`StableDiffusion.from_components`)."""

    def __init__(self, comps, params, cfg):
        from sd_jax.pipelines.pipeline import StableDiffusion

        self.cfg = cfg
        self.prompts = list(cfg.sample_prompts)
        if not self.prompts:
            raise ValueError("sample_every is set but sample_prompts is empty")
        self.pipe = StableDiffusion.from_components(comps, params)

    def render(self, state, frozen, merge=None) -> np.ndarray | None:
        """A uint8 [rows*H, cols*W, 3] grid of one image per prompt (None off the main process).

        ``merge(trained, frozen)`` gives the full weights (default: the trained components replace the frozen
        ones; the LoRA trainer folds its adapters into the frozen base instead)."""
        cfg = self.cfg
        trained = state["ema"] if cfg.get("sample_ema", True) and state["ema"] is not None else state["params"]
        params = merge(trained, frozen) if merge else {**frozen, **trained}
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return None
        self.pipe.set_params(params)
        size = cfg.get("sample_size") or cfg.data.image_size
        images, _ = self.pipe.txt2img(self.prompts, height=size, width=size, steps=cfg.get("sample_steps", 25),
                                      guidance_scale=cfg.get("sample_guidance", 7.5), seed=cfg.get("sample_seed", 0),
                                      sampler=cfg.get("sample_sampler", "euler"))  # fmt: skip
        n = len(self.prompts)
        return to_uint8(make_grid(images, rows=-(-n // math.ceil(math.sqrt(n)))))  # near-square, row-major
