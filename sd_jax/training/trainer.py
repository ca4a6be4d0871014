"""The training run: models from config, a sharded plain-pytree state, one jitted step, checkpoints, the loop.

State is ``{"step", "params", "ema", "opt", "rng"}``. It is built with
``jax.eval_shape`` and ``jit(out_shardings=...)`` so it is born sharded, and the
step donates it. Parameters, EMA and optimizer moments are sharded by the
logical-axis rules in the config (``dp``, ``fsdp``, ``fsdp_tp``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sd_jax import sharding as shard_lib
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.schedules import NoiseSchedule
from sd_jax.training import objectives
from sd_jax.training.checkpoints import (
    FiniteGuard,
    checkpoint_manager,
    require_checkpoint,
    restore_for_export,
    restore_or_init,
)
from sd_jax.training.checks import scratch_model_configs
from sd_jax.training.conditioning import check_text_conditioning, encode_text, load_tokenizers, sdxl_batch_extras
from sd_jax.training.optim import ema_decay, ema_update, learning_rate, optimizer
from sd_jax.training.preemption import Preempted, StopSignals


@dataclasses.dataclass
class Models:
    unet: Any
    vae: Any
    text: Any
    schedule: NoiseSchedule
    params: dict  # all components, fp32 master copies
    trainable: tuple[str, ...]
    text_2: Any = None  # SDXL's second encoder (OpenCLIP bigG with projection)
    path: pathlib.Path | None = None  # the checkpoint folder fine-tuned from (its tokenizers, model_index)
    index: dict = dataclasses.field(default_factory=dict)  # its model_index.json

    @property
    def sdxl(self) -> bool:
        return self.text_2 is not None


def build_models(cfg) -> Models:
    """From ``cfg.init_from`` (a diffusers folder / single file: fine-tuning) or tiny random configs (from scratch)."""
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.compute_dtype]
    tcfg2, path, index = None, None, {}
    if cfg.get("init_from"):
        from sd_jax.loading.diffusers import load_checkpoint

        ckpt = load_checkpoint(cfg.init_from)
        ucfg, vcfg, tcfg = ckpt.config("unet"), ckpt.config("vae"), ckpt.config("text_encoder")
        params = {"unet": ckpt.params("unet"), "vae": ckpt.params("vae"), "text_encoder": ckpt.params("text_encoder")}
        schedule = NoiseSchedule.from_diffusers_config(ckpt.scheduler_config)
        if "text_encoder_2" in ckpt.models:
            tcfg2 = ckpt.config("text_encoder_2")
            params["text_encoder_2"] = ckpt.params("text_encoder_2")
        check_text_conditioning(ckpt.path, ucfg, tcfg, tcfg2)
        path, index = ckpt.path, ckpt.index
    else:
        ucfg, vcfg, tcfg = scratch_model_configs(cfg)
        key = jax.random.key(cfg.seed)
        params = {
            "unet": unet_lib.init_params(ucfg, jax.random.fold_in(key, 0)),
            "vae": vae_lib.init_params(vcfg, jax.random.fold_in(key, 1)),
            "text_encoder": clip_lib.init_params(tcfg, jax.random.fold_in(key, 2)),
        }
        schedule = NoiseSchedule()
        for name, src in dict(cfg.get("init_components") or {}).items():  # e.g. a VAE trained by an earlier run
            from sd_jax.loading.diffusers import load_component

            loaded_cfg, params[name] = load_component(src, name)
            ucfg, vcfg, tcfg = {"unet": (loaded_cfg, vcfg, tcfg), "vae": (ucfg, loaded_cfg, tcfg),
                                "text_encoder": (ucfg, vcfg, loaded_cfg)}[name]  # fmt: skip
    schedule = dataclasses.replace(
        schedule,
        prediction_type=cfg.objective.prediction_type or schedule.prediction_type,
        rescale_betas_zero_snr=bool(cfg.objective.zero_snr) or schedule.rescale_betas_zero_snr,
    )
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    unknown = [n for n in cfg.train if n not in params]
    if unknown:
        raise ValueError(f"config.train names {unknown}, but this model has only {sorted(params)}")
    return Models(
        unet=unet_lib.UNet2DConditionModel(ucfg, dtype=compute, remat_policy=cfg.get("remat_policy")),
        vae=vae_lib.AutoencoderKL(vcfg, dtype=jnp.float32),
        text=clip_lib.CLIPTextModel(tcfg, dtype=compute),
        schedule=schedule,
        params=params,
        trainable=tuple(cfg.train),
        text_2=clip_lib.CLIPTextModel(tcfg2, dtype=compute) if tcfg2 else None,
        path=path,
        index=index,
    )


def loss_fn(models: Models, cfg, trainable, frozen, batch, key):
    p = {**frozen, **trainable}
    images = batch.get("images")  # absent with the latent cache (data.cache)
    if "vae" in models.trainable and models.trainable == ("vae",):
        mean, logvar = models.vae.apply({"params": p["vae"]}, images, method=vae_lib.AutoencoderKL.encode)
        z = vae_lib.DiagonalGaussian(mean, logvar).sample(key)
        recon = models.vae.apply({"params": p["vae"]}, z, method=vae_lib.AutoencoderKL.decode)
        return objectives.vae_loss(recon.astype(jnp.float32), images, mean, logvar, kind=cfg.objective.vae_loss,
                                   kl_weight=cfg.objective.kl_weight)  # fmt: skip
    k_enc, k_loss = jax.random.split(key)
    if "latent_mean" in batch:  # data.cache: the posterior was computed once, offline
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
        mean, logvar = models.vae.apply({"params": p["vae"]}, images, method=vae_lib.AutoencoderKL.encode)
    vcfg = models.vae.config
    z = (vae_lib.DiagonalGaussian(mean, logvar).sample(k_enc) - (vcfg.shift_factor or 0.0)) * vcfg.scaling_factor
    if "vae" not in models.trainable:
        z = jax.lax.stop_gradient(z)
    if "context" in batch:  # data.cache: frozen text encoder outputs
        cond = {"context": batch["context"]}
    else:
        cond = encode_text(models, p, batch)

    def model_fn(x_t, t):
        return models.unet.apply({"params": p["unet"]}, x_t, t, cond["context"], text_embeds=cond.get("text_embeds"),
                                 time_ids=cond.get("time_ids"))  # fmt: skip

    return objectives.diffusion_loss(model_fn, z, k_loss, models.schedule, min_snr_gamma=cfg.objective.min_snr_gamma,
                                     offset_noise=cfg.objective.offset_noise, prior_mask=batch.get("prior_mask"),
                                     prior_weight=cfg.objective.get("prior_loss_weight", 1.0))  # fmt: skip


# -- sharding --


def _boxed(models: Models, name: str):
    """Boxed abstract params (logical axis names attached) of one component."""
    if name == "unet":
        cfg = models.unet.config
        args, extra = unet_lib._dummy_inputs(cfg)
        return jax.eval_shape(lambda k: models.unet.init(k, *args, **extra), jax.random.key(0))["params"]
    if name == "vae":
        x = vae_lib._dummy(models.vae.config)
        return jax.eval_shape(lambda k: models.vae.init(k, x), jax.random.key(0))["params"]
    text = models.text_2 if name == "text_encoder_2" else models.text
    ids = jnp.zeros((1, text.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda k: text.init(k, ids), jax.random.key(0))["params"]


def param_shardings(models: Models, mesh, rules) -> dict:
    return {n: shard_lib.param_shardings(_boxed(models, n), mesh, rules) for n in models.params}


def _like_params(tree, pshard: dict, mesh):
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path gets its sharding."""
    flat = {}
    for name, sub in pshard.items():
        for path, sh in jax.tree_util.tree_flatten_with_path(sub)[0]:
            flat[(name, *(k.key for k in path))] = sh

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            if keys[i:] in flat:
                return flat[keys[i:]]
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, tree)


# -- the state and the step --


class Trainer:
    """Whole components trained. Subclasses (``lora_trainer``) change what is optimized through the hooks
    ``split_params``, ``trainable_init`` and ``loss``."""

    def __init__(self, cfg, mesh=None):
        self.cfg = cfg
        self.mesh = mesh or shard_lib.make_mesh(dict(cfg.mesh))
        self.models = build_models(cfg)
        self.tx = optimizer(cfg.optim)
        self.lr = learning_rate(cfg.optim)
        rules = cfg.sharding
        pshard = param_shardings(self.models, self.mesh, rules)
        self.frozen_names, self.param_sh = self.split_params(pshard)
        self.frozen_sh = {n: pshard[n] for n in self.frozen_names}
        trainable = self.trainable_init()
        abstract = jax.eval_shape(self._init_state, trainable)
        self.state_sh = {
            "step": NamedSharding(self.mesh, PartitionSpec()),
            "params": self.param_sh,
            "ema": self.param_sh if cfg.optim.ema_decay else None,
            "opt": _like_params(abstract["opt"], self.param_sh, self.mesh),
            "rng": NamedSharding(self.mesh, PartitionSpec()),
        }
        self.abstract_state = abstract
        self.tokenizers = load_tokenizers(self.models)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_sh, self.frozen_sh, None),  # the batch comes placed by put_batch
            out_shardings=(self.state_sh, NamedSharding(self.mesh, PartitionSpec())),
            donate_argnums=(0,),
        )

    def split_params(self, pshard):
        """(names of the frozen components, shardings of the trainable pytree)."""
        names = self.models.trainable
        return tuple(n for n in self.models.params if n not in names), {n: pshard[n] for n in names}

    def trainable_init(self):
        """The pytree the optimizer updates."""
        return {n: self.models.params[n] for n in self.models.trainable}

    def loss(self, trainable, frozen, batch, key):
        return loss_fn(self.models, self.cfg, trainable, frozen, batch, key)

    def merged_params(self, trainable, frozen) -> dict:
        """The full weights of every component (what sampling during training uses)."""
        return {**frozen, **trainable}

    def _init_state(self, trainable):
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": trainable,
            "ema": trainable if self.cfg.optim.ema_decay else None,
            "opt": self.tx.init(trainable),
            "rng": jax.random.key_data(jax.random.key(self.cfg.seed)),
        }

    def init_state(self):
        return jax.jit(self._init_state, out_shardings=self.state_sh)(self.trainable_init())

    def frozen(self):
        return jax.device_put({n: self.models.params[n] for n in self.frozen_names}, self.frozen_sh)

    def _train_step(self, state, frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def f(p):
            return self.loss(p, frozen, batch, key)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema is not None:
            ema = ema_update(ema, params, ema_decay(self.cfg.optim, state["step"]))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": self.lr(state["step"]), **aux}
        return {"step": state["step"] + 1, "params": params, "ema": ema, "opt": opt, "rng": state["rng"]}, metrics

    def put_batch(self, batch):
        """Each process holds its own slice of the global batch (pixels and ids, or cached latents and context)."""
        if self.models.sdxl:
            batch = {**batch, **sdxl_batch_extras(batch, self.tokenizers)}
        out = {}
        for k, v in batch.items():
            ints = k.startswith("input_ids") or k in ("original_size", "crop_top_left")
            v = np.asarray(v, np.int32 if ints else np.float32)
            out[k] = _global(v, shard_lib.batch_sharding(self.mesh, v.ndim))
        return out

    def step(self, state, frozen, batch):
        return self._step(state, frozen, self.put_batch(batch))


def _global(local: np.ndarray, sharding):
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


# -- the loop --


def tokenizer_for(cfg):
    from sd_jax.tokenizer import load_tokenizer

    return load_tokenizer(pathlib.Path(cfg.init_from) / "tokenizer" if cfg.get("init_from") else None)


def train(cfg, workdir, *, log=None, stop_at: int | None = None, trainer: Trainer | None = None,
          source=None) -> dict:  # fmt: skip
    """Run (or resume) training to ``cfg.steps``; returns the last metrics. ``stop_at`` ends early (tests).

    ``trainer`` and ``source`` default to a :class:`Trainer` and the config's data source. Raises
    :class:`~sd_jax.training.preemption.Preempted` after saving on SIGTERM/SIGINT, :class:`NonFiniteLoss` (before
    any non-finite state is saved), :class:`~sd_jax.training.checkpoints.CheckpointRestoreError` when no kept
    checkpoint restores, and :class:`~sd_jax.training.memory.MemoryEstimateError` before the first step when the
    step would not fit.
    """
    import orbax.checkpoint as ocp

    from sd_jax.training.data import make_source
    from sd_jax.training.memory import check_step_memory
    from sd_jax.training.monitor import Monitor

    workdir = pathlib.Path(workdir)
    with StopSignals() as signals:
        trainer = trainer or Trainer(cfg)
        mgr = checkpoint_manager(workdir, cfg)
        state, start = restore_or_init(trainer, mgr, log=log or print)
        frozen = trainer.frozen()
        tokenizer = trainer.tokenizers[0]
        source = source or make_source(cfg.data, tokenizer, workdir=workdir)
        if hasattr(source, "check_models"):  # the latent cache must come from these weights
            source.check_models(trainer.models, cfg)
        sample_every = cfg.get("sample_every") or 0
        if sample_every:
            from sd_jax.training.samples import SampleRenderer

            renderer = SampleRenderer(trainer.models, tokenizer, cfg)
        per_host = cfg.batch_size // jax.process_count()
        end = min(cfg.steps, stop_at) if stop_at else cfg.steps
        step_fn, placed = None, None
        if start < end:  # compile once, and refuse before the first step when it cannot fit
            placed = trainer.put_batch(source.batch(start, per_host, offset=jax.process_index() * per_host))
            step_fn = trainer._step.lower(state, frozen, placed).compile()
            check_step_memory(step_fn, cfg)
        monitor = Monitor(cfg, workdir, start, log=log)
        log = monitor.log
        guard = FiniteGuard()
        metrics, saved = {}, (start or None)
        try:
            t0 = time.time()
            for step in range(start, end):
                if signals.signum is not None:  # arrived before the first step (while compiling)
                    break
                if step > start:
                    placed = trainer.put_batch(source.batch(step, per_host, offset=jax.process_index() * per_host))
                state, m = step_fn(state, frozen, placed)
                guard.update(m, step + 1)
                monitor.step()
                done = step + 1 == end or signals.signum is not None
                if (step + 1) % cfg.log_every == 0 or done:
                    guard.check(saved)
                    metrics = {k: float(v) for k, v in jax.device_get(m).items()}
                    dt = (time.time() - t0) / cfg.log_every
                    t0 = time.time()
                    metrics.update(step=step + 1, step_time=dt, images_per_s=cfg.batch_size / max(dt, 1e-9),
                                   skipped_images=source.skipped + source.prepared_skipped)  # fmt: skip
                    monitor.metrics(metrics)
                if sample_every and (step + 1) % sample_every == 0:
                    ts = time.time()
                    monitor.samples(step + 1, renderer.render(state, frozen, trainer.merged_params))
                    t0 += time.time() - ts  # sampling time is not training step time
                stop = done or signals.signum is not None
                if stop or mgr.should_save(step + 1):
                    guard.check(saved)  # never write a non-finite state
                    mgr.save(step + 1, args=ocp.args.StandardSave(state), force=stop)
                    saved = step + 1
                if stop:
                    break
            mgr.wait_until_finished()
        finally:
            monitor.close()
            mgr.close()
        if signals.signum is not None:
            raise Preempted(saved or start, signals.signum, saved=saved is not None and saved > start)
    metrics["state"] = state
    return metrics


def export(cfg, workdir, out, *, use_ema=True):
    """Write the latest checkpoint (EMA or raw weights) as a diffusers folder."""
    from sd_jax.loading.diffusers import Checkpoint
    from sd_jax.loading.export import save_checkpoint

    require_checkpoint(workdir)  # before the models load
    trainer = Trainer(cfg)
    state, step = restore_for_export(trainer, workdir, cfg)
    trained = state["ema"] if use_ema and state["ema"] is not None else state["params"]
    params = {**trainer.models.params, **jax.device_get(trained)}
    m = trainer.models
    models = {"unet": (m.unet.config, params["unet"]), "vae": (m.vae.config, params["vae"]),
              "text_encoder": (m.text.config, params["text_encoder"])}  # fmt: skip
    # a frozen encoder keeps its loaded scale: the latents (and any U-Net trained on them) stay the same
    frozen_encoder = "vae/encoder" in tuple(cfg.optim.get("freeze", ()) or ())
    if m.trainable == ("vae",) and not frozen_encoder:  # record the latent scale users need (SD: 1 / std of latents)
        from sd_jax.tokenizer import load_tokenizer
        from sd_jax.training.data import make_source

        scale = latent_scaling_factor(m.vae, params["vae"], make_source(cfg.data, load_tokenizer(None)))
        models["vae"] = (dataclasses.replace(m.vae.config, scaling_factor=scale), params["vae"])
    sched = {"_class_name": "EulerDiscreteScheduler", **dataclasses.asdict(m.schedule)}
    index = {"_class_name": "StableDiffusionPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}  # fmt: skip
    if m.sdxl:
        models["text_encoder_2"] = (m.text_2.config, params["text_encoder_2"])
        index = {"_class_name": "StableDiffusionXLPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                 "force_zeros_for_empty_prompt": m.index.get("force_zeros_for_empty_prompt", True)}  # fmt: skip
    src = Checkpoint(m.path or pathlib.Path(out), index, models, sched)
    dtype = {None: None, "float32": None, "float16": np.float16}[cfg.get("export_dtype")]
    return save_checkpoint(out, src, dtype=dtype)


def latent_scaling_factor(vae, params, source, *, batches: int = 8, batch_size: int = 64) -> float:
    """``1 / std`` of the posterior means over a few training batches (how SD's 0.18215 was chosen)."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode)[0])
    z = np.concatenate([np.asarray(encode(params, source.batch(i, batch_size)["images"])) for i in range(batches)])
    return float(1.0 / (z.std() + 1e-8))
