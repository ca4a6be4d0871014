"""ControlNet training (Zhang et al. 2023): the base model is frozen; a ControlNet learns the diffusion loss.

The ControlNet starts as diffusers' ``ControlNetModel.from_unet`` (the U-Net's encoder weights, a fresh hint
encoder, zero convolutions, so step 0 reproduces the base model), or from ``controlnet.init_from`` (a diffusers
ControlNet folder or single file). Each batch carries its conditioning image as ``control`` (made by the input
pipeline, :mod:`sd_jax.data.control`); the U-Net runs with the ControlNet's residuals added. The state's
``params`` are the ControlNet's only, sharded by the same logical-axis rules as the U-Net it copies. The run
writes ``WORKDIR/controlnet``, a diffusers ControlNet folder.
"""

from __future__ import annotations

import pathlib

import jax

from sd_jax import placement
from sd_jax.data import control as control_data
from sd_jax.models import controlnet as cn
from sd_jax.training.trainers.base import Objective
from sd_jax.training.trainers.diffusion import diffusion_loss

NAME = "controlnet"


class ControlNet(Objective):
    def __init__(self, cfg, comps, params):
        super().__init__(cfg, comps, params)
        if not control_data.check(cfg.data):
            raise ValueError("ControlNet training needs conditioning images: set data.control (column, canny, "
                             "silhouette)")  # fmt: skip
        c = cfg.controlnet
        if c.get("init_from"):
            from sd_jax.loading.controlnet import check_base, load_controlnet

            self.config, self.start = load_controlnet(c.init_from)
            check_base(self.config, comps.unet.config, str(c.init_from))
        else:
            self.config, self.start = cn.from_unet(
                comps.unet.config, params["unet"], jax.random.key(cfg.seed + 2),
                conditioning_channels=c.get("conditioning_channels", 3),
                conditioning_embedding_out_channels=tuple(c.conditioning_embedding_out_channels),
            )  # fmt: skip
        self.model = cn.ControlNetModel(
            self.config,
            dtype=comps.unet.dtype,
            remat_policy=cfg.get("remat_policy"),
            attention=comps.unet.attention,
            conv=comps.unet.conv,
        )

    def check_trained(self) -> None:
        if self.trained != (NAME,):
            raise ValueError(f"ControlNet training: train must be ('controlnet',), got {self.trained}")

    # -- what is trained: the ControlNet; the whole base model is frozen --

    def frozen_names(self):
        return tuple(self.params)

    def init_trainable(self):
        return self.start

    def trainable_shardings(self, param_shardings, mesh):
        return placement.controlnet_shardings(self.model, mesh, self.cfg.sharding)

    def merged(self, trainable, frozen):
        return dict(frozen)  # in-training samples show the base model

    def loss(self, net, frozen, batch, key):
        hint = batch["control"]

        def residuals(x_t, t, cond):
            down, mid = self.model.apply(
                {"params": net},
                x_t,
                t,
                cond["context"],
                hint,
                text_embeds=cond.get("text_embeds"),
                time_ids=cond.get("time_ids"),
            )
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return diffusion_loss(self.comps, self.cfg, dict(frozen), batch, key, (), unet_extra=residuals)

    # -- the result: a diffusers ControlNet folder --

    def finish(self, workdir, state, log=print):
        if jax.process_index() != 0:
            return {}
        path = self.export(workdir, state, pathlib.Path(workdir) / NAME)
        log(f"wrote {path}")
        return {"controlnet": path}

    def export(self, workdir, state, out, *, use_ema=True):
        import numpy as np

        from sd_jax.loading.export import save_component

        dtype = {None: None, "float32": None, "float16": np.float16}[self.cfg.get("export_dtype")]
        return save_component(out, self.config, self.trained_weights(state, use_ema), dtype=dtype)
