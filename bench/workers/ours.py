"""Worker for sd-jax (ours): U-Net step, txt2img, compile time, training, peak memory, matmul peak."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from bench.workers.protocol import peak_rss_bytes, serve, timed


def _jax_setup(spec):
    if spec.get("xla_flags") is not None and "jax" not in sys.modules:  # bench.xla_flags: before jax starts
        os.environ["XLA_FLAGS"] = spec["xla_flags"]
    import jax

    if spec.get("cache_dir"):
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def _dtype(name):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _versions():
    import flax
    import jax
    import jaxlib
    import optax

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "jax_device": str(jax.devices()[0].device_kind)}  # fmt: skip


def build_unet_step(spec):
    """The compiled U-Net forward and its inputs (random weights at initializer scale)."""
    jax = _jax_setup(spec)
    import jax.numpy as jnp

    from bench.workers.random_weights import random_like
    from sd_jax.models import attention_kernels, conv_kernels
    from sd_jax.models.unet import UNet2DConditionModel, UNetConfig, abstract_params

    dt = _dtype(spec["dtype"])
    cfg = UNetConfig.from_diffusers_config(spec["unet_config"])
    # the kernels the pipeline resolves for this backend ("auto"), unless the spec names one
    model = UNet2DConditionModel(cfg, dtype=dt, param_dtype=dt,
                                 attention=attention_kernels.resolve(spec.get("attention", "auto")),
                                 conv=conv_kernels.resolve(spec.get("conv", "auto")))  # fmt: skip
    params = jax.tree.map(lambda a: jnp.asarray(a, dt), random_like(abstract_params(cfg)))
    b, s, n = spec["batch"], spec["latent_size"], spec["context_len"]
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (b, s, s, cfg.in_channels), jnp.float32).astype(dt)
    ctx = jax.random.normal(keys[1], (b, n, cfg.cross_attention_dim), jnp.float32).astype(dt)
    t = jnp.full((b,), 500.0, jnp.float32)
    t0 = time.perf_counter()
    step = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)).lower(params, x, t, ctx).compile()
    return step, (params, x, t, ctx), time.perf_counter() - t0


def xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def unet_step(spec):
    """One U-Net forward at the given shapes (batch 2: the CFG pair), random weights, jitted."""
    step, args, compile_s = build_unet_step(spec)
    step(*args).block_until_ready()  # first run: allocations, thread pools

    def run(_):
        return {"seconds": timed(lambda: step(*args).block_until_ready())}

    info = {"compile_s": compile_s, "flops": unet_flops(spec), "versions": _versions()}
    return info, {"run": run}


def unet_flops(spec) -> float:
    """XLA's FLOP count of the U-Net step, compiled with attention in one piece (the ``xla`` kernel): cost
    analysis counts the body of a ``lax.map`` loop once, so the blocked attention path would hide most attention
    FLOPs."""
    return xla_flops(build_unet_step({**spec, "attention": "xla"})[0])


def matmul(spec):
    """A dense square matmul: the machine's practical peak for this dtype."""
    jax = _jax_setup(spec)
    import jax.numpy as jnp

    n, dt = spec["n"], _dtype(spec["dtype"])
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    f(a, b).block_until_ready()
    return {"flops": 2.0 * n**3}, {"run": lambda _: {"seconds": timed(lambda: f(a, b).block_until_ready())}}


def _pipeline(spec):
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.load(spec["folder"], dtype=spec["dtype"], safety_checker=False)

    def generate():
        images, _ = pipe.txt2img(
            [spec["prompt"]] * spec["batch"],
            steps=spec["steps"],
            sampler=spec["sampler"],
            guidance_scale=spec["guidance"],
            height=spec["size"],
            width=spec["size"],
            seed=0,
        )
        return images  # numpy: the whole computation has finished

    return generate


def txt2img(spec):
    _jax_setup(spec)
    generate = _pipeline(spec)
    first = timed(generate)
    run = lambda _: {"seconds": timed(generate) / spec["batch"]}  # noqa: E731
    return {"first_s": first, "versions": _versions()}, {"run": run}


def compile_time(spec):
    """A fresh process: load, first call (compiles, or reads the persistent cache), second call."""
    _jax_setup(spec)
    t0 = time.perf_counter()
    generate = _pipeline(spec)
    load = time.perf_counter() - t0
    first = timed(generate)
    second = timed(generate)
    return {"load_s": load, "first_s": first, "second_s": second, "compile_s": first - second}, {}


def memory(spec):
    """Peak resident memory of a fresh process that loads the pipeline and samples once."""
    _jax_setup(spec)
    generate = _pipeline(spec)
    loaded = peak_rss_bytes()  # the peak so far: loading the weights
    generate()
    return {"peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": loaded}, {}


def train(spec):
    """Our trainer's jitted step on a config file; throughput in images per second.

    Weights only need the right shapes: components the config would load from an earlier run
    (``init_components``) are random instead, and batches are synthetic at the config's image size
    (prepared before timing: data loading is not measured).
    """
    import jax

    from sd_jax.data import make_source
    from sd_jax.training.loop import Trainer

    mod_spec = importlib.util.spec_from_file_location("bench_config", spec["config"])
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config()
    if cfg.get("init_components"):
        cfg.init_components = {}
    cfg.data.source = "synthetic"
    trainer = Trainer(cfg)
    state, frozen = trainer.init_state(), trainer.frozen()
    source = make_source(cfg.data, trainer.tokenizers[0])
    batches = [trainer.put_batch(source.batch(i, cfg.batch_size)) for i in range(4)]
    holder = {"state": state, "i": 0}

    def steps(n):
        for _ in range(n):
            holder["state"], m = trainer._step(holder["state"], frozen, batches[holder["i"] % len(batches)])
            holder["i"] += 1
        jax.block_until_ready(m["loss"])

    compile_s = timed(lambda: steps(1))
    steps(1)
    n = spec["steps_per_run"]

    def run(_):
        return {"images_per_s": n * cfg.batch_size / timed(lambda: steps(n))}

    m = trainer.models
    info = {  # what a PyTorch loop needs to do the same work
        "compile_s": compile_s, "batch_size": cfg.batch_size, "image_size": cfg.data.image_size,
        "unet_config": m.unet.config.to_diffusers_config(), "vae_config": m.vae.config.to_diffusers_config(),
        "text_config": m.text.config.to_diffusers_config(), "trainable": list(m.trainable),
        "alphas_cumprod": [float(a) for a in m.schedule.alphas_cumprod()],
        "prediction_type": m.schedule.prediction_type,
        "min_snr_gamma": cfg.objective.min_snr_gamma, "compute_dtype": cfg.compute_dtype,
        "optim": {k: cfg.optim.get(k, d) for k, d in
                  (("lr", 1e-4), ("b1", 0.9), ("b2", 0.999), ("weight_decay", 0.0), ("clip_norm", 0.0),
                   ("ema_decay", 0.0), ("grad_accum", 1))},
        "params": sum(int(x.size) for x in jax.tree.leaves(m.params["unet"])), "versions": _versions(),
    }  # fmt: skip
    return info, {"run": run}


TASKS = {"unet_step": unet_step, "matmul": matmul, "txt2img": txt2img, "compile": compile_time,
         "memory": memory, "train": train}  # fmt: skip

if __name__ == "__main__":
    serve(lambda spec: TASKS[spec["task"]](spec))
