"""Worker for diffusers 0.39 Flax (its own virtual environment): U-Net step, txt2img, compile time, memory."""

from __future__ import annotations

import time

from bench.workers.protocol import peak_rss_bytes, serve, timed

SCHEDULERS = {"ddim": "FlaxDDIMScheduler", "euler": "FlaxEulerDiscreteScheduler",
              "dpmpp_2m": "FlaxDPMSolverMultistepScheduler"}  # fmt: skip


def _jax_setup(spec):
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
    import diffusers
    import flax
    import jax
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "jax": jax.__version__,
            "flax": flax.__version__}  # fmt: skip


def _flax_config(cfg: dict) -> dict:
    """diffusers' Flax U-Net takes ``layers_per_block`` only as one int."""
    lpb = cfg.get("layers_per_block")
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ValueError(f"diffusers Flax needs one layers_per_block for all blocks, got {lpb}")
        cfg = {**cfg, "layers_per_block": lpb[0]}
    return cfg


def unet_step(spec):
    jax = _jax_setup(spec)
    import jax.numpy as jnp
    from diffusers import FlaxUNet2DConditionModel

    dt = _dtype(spec["dtype"])
    model = FlaxUNet2DConditionModel.from_config(_flax_config(spec["unet_config"]), dtype=dt)
    from bench.workers.random_weights import random_like

    shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
    params = jax.tree.map(lambda a: jnp.asarray(a, dt), random_like(shapes))
    b, s, n = spec["batch"], spec["latent_size"], spec["context_len"]
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (b, model.config.in_channels, s, s), jnp.float32).astype(dt)  # NCHW
    ctx = jax.random.normal(keys[1], (b, n, model.config.cross_attention_dim), jnp.float32).astype(dt)
    t = jnp.full((b,), 500, jnp.int32)
    t0 = time.perf_counter()
    fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c, train=False).sample)
    step = fn.lower(params, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    step(params, x, t, ctx).block_until_ready()

    def run(_):
        return {"seconds": timed(lambda: step(params, x, t, ctx).block_until_ready())}

    return {"compile_s": compile_s, "versions": _versions()}, {"run": run}


def _flax_model(cls, folder, dt):
    """A diffusers Flax model with the weights of the folder's safetensors (0.39's ``from_pt`` reads only .bin)."""
    import pathlib
    import types

    import jax
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    from safetensors.torch import load_file

    model = cls.from_config(_flax_config(dict(cls.load_config(folder))), dtype=dt)
    files = sorted(pathlib.Path(folder).glob("*.safetensors"))
    state = {}
    for f in files:
        if ".fp16." not in f.name:
            state.update(load_file(f))
    # The conversion only reads the shapes of ``init_weights``: trace it instead of compiling a random init
    # (minutes on CPU), as ``from_pt`` would.
    shapes = types.SimpleNamespace(init_weights=lambda rng: jax.eval_shape(model.init_weights, rng))
    return model, convert_pytorch_state_dict_to_flax(state, shapes)


def _flax_text_encoder(cls, folder, dt):
    """transformers' Flax CLIP text model with the folder's safetensors weights, without a compiled random init."""
    import pathlib
    import types

    from safetensors.torch import load_file
    from transformers import CLIPTextConfig
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    model = cls(CLIPTextConfig.from_pretrained(folder), dtype=dt, _do_init=False)
    state = {}
    for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    shapes = types.SimpleNamespace(base_model_prefix=model.base_model_prefix, params=model.params_shape_tree)
    return model, convert_pytorch_state_dict_to_flax(state, shapes)


def _pipeline(spec):
    """FlaxStableDiffusionPipeline over the folder's weights, run with ``jit=True`` (pmap over the devices)."""
    import os

    jax = _jax_setup(spec)
    import diffusers
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from transformers import CLIPTokenizer, FlaxCLIPTextModel

    dt, root = _dtype(spec["dtype"]), spec["folder"]
    sched, sched_state = getattr(diffusers, SCHEDULERS[spec["sampler"]]).from_pretrained(root, subfolder="scheduler")
    unet, unet_params = _flax_model(diffusers.FlaxUNet2DConditionModel, os.path.join(root, "unet"), dt)
    vae, vae_params = _flax_model(diffusers.FlaxAutoencoderKL, os.path.join(root, "vae"), dt)
    text, text_params = _flax_text_encoder(FlaxCLIPTextModel, os.path.join(root, "text_encoder"), dt)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    pipe = diffusers.FlaxStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                 scheduler=sched, safety_checker=None, feature_extractor=None,
                                                 dtype=dt)  # fmt: skip
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
    params = {k: jax.tree.map(lambda a: a.astype(dt), v) for k, v in params.items()}
    params["scheduler"] = sched_state
    n_dev = jax.local_device_count()
    if spec["batch"] % n_dev:
        raise ValueError(f"batch {spec['batch']} does not split over {n_dev} devices")
    p_params = replicate(params)
    ids = shard(pipe.prepare_inputs([spec["prompt"]] * spec["batch"]))
    rng = jax.random.split(jax.random.PRNGKey(0), n_dev)

    def generate():
        out = pipe(ids, p_params, rng, num_inference_steps=spec["steps"], height=spec["size"], width=spec["size"],
                   guidance_scale=spec["guidance"], jit=True).images  # fmt: skip
        return jax.block_until_ready(out)

    return generate


def txt2img(spec):
    generate = _pipeline(spec)
    first = timed(generate)
    run = lambda _: {"seconds": timed(generate) / spec["batch"]}  # noqa: E731
    return {"first_s": first, "versions": _versions()}, {"run": run}


def compile_time(spec):
    t0 = time.perf_counter()
    generate = _pipeline(spec)
    load = time.perf_counter() - t0
    first = timed(generate)
    second = timed(generate)
    return {"load_s": load, "first_s": first, "second_s": second, "compile_s": first - second}, {}


def memory(spec):
    generate = _pipeline(spec)
    loaded = peak_rss_bytes()  # the peak so far: loading the weights
    generate()
    return {"peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": loaded}, {}


TASKS = {"unet_step": unet_step, "txt2img": txt2img, "compile": compile_time, "memory": memory}

if __name__ == "__main__":
    serve(lambda spec: TASKS[spec["task"]](spec))
