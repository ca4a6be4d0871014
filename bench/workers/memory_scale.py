"""Device memory at scale from XLA's compiled memory analysis: nothing is allocated, no accelerator is needed.

Run as ``python -m bench.workers.memory_scale JSON`` in a process with 8 simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``); prints one JSON line of results.

- ``sampling``: SDXL-class sampling on one device: the U-Net step on the CFG pair and the VAE decode, each
  compiled from abstract weights (``jax.ShapeDtypeStruct``), plus the weights that stay resident meanwhile.
- ``training``: our trainer's jitted step (``sd_jax.training.loop.Trainer``) for a fine-tune config, on abstract
  weights, under a sharding preset and mesh: the bytes one device needs (``sd_jax.training.memory.step_bytes``).

The CPU compiler plans the memory here, with the ``blocked`` attention kernel (like the flash kernels, it never
holds a full score matrix): an estimate of what an accelerator needs, not a measurement on one.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp

from sd_jax import components as C
from sd_jax.loading.diffusers import read_json
from sd_jax.models import clip, unet, vae
from sd_jax.schedules import NoiseSchedule
from sd_jax.training.memory import step_bytes


def _components(folder: pathlib.Path, dtype, param_dtype, remat_policy=None):
    """Components of a configs-only diffusers folder, and its weights as shapes (float32 masters or ``dtype``)."""
    ucfg = unet.UNetConfig.from_diffusers_config(read_json(folder / "unet" / "config.json"))
    vcfg = vae.VAEConfig.from_diffusers_config(read_json(folder / "vae" / "config.json"))
    names = [n for n in C.TEXT_NAMES if (folder / n).is_dir()]
    tcfgs = [clip.CLIPTextConfig.from_diffusers_config(read_json(folder / n / "config.json")) for n in names]
    comps = C.Components(
        unet=unet.UNet2DConditionModel(
            ucfg, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy, attention="blocked"
        ),  # fmt: skip
        vae=vae.AutoencoderKL(vcfg, dtype=jnp.float32, attention="blocked"),
        text_encoders=tuple(clip.CLIPTextModel(t, dtype=dtype, param_dtype=param_dtype) for t in tcfgs),
        tokenizers=tuple(C._tokenizer(None, t.max_position_embeddings) for t in tcfgs),
        schedule=NoiseSchedule(),
        pipeline_class="StableDiffusionXLPipeline" if len(names) == 2 else "StableDiffusionPipeline",
    )
    shapes = {"unet": unet.abstract_params(ucfg, param_dtype), "vae": vae.abstract_params(vcfg, jnp.float32)}
    shapes.update({n: clip.abstract_params(t, param_dtype) for n, t in zip(names, tcfgs)})
    return comps, shapes


def _nbytes(tree) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def sampling(spec) -> dict:
    folder, batch, size = pathlib.Path(spec["folder"]), spec["batch"], spec["image_size"]
    dt = C.dtype_of(spec["dtype"])
    comps, shapes = _components(folder, dt, dt)
    ucfg, f = comps.unet.config, comps.vae.config.downsample_factor
    (x, t, ctx), extra = unet._dummy_inputs(ucfg, 2 * batch)
    s = size // f
    x = jax.ShapeDtypeStruct((2 * batch, s, s, ucfg.in_channels), dt)
    ctx = jax.ShapeDtypeStruct((2 * batch, 77, ucfg.cross_attention_dim), dt)
    extra = {k: jax.ShapeDtypeStruct(v.shape, dt) for k, v in extra.items()}
    step = jax.jit(lambda p, x, t, c, e: comps.unet.apply({"params": p}, x, t, c, **e))
    unet_step = step_bytes(step.lower(shapes["unet"], x, jax.ShapeDtypeStruct((2 * batch,), jnp.float32), ctx,
                                      extra).compile())  # fmt: skip
    z = jax.ShapeDtypeStruct((batch, s, s, comps.vae.config.latent_channels), jnp.float32)
    decode = jax.jit(lambda p, z: C.decode_latents(comps, {"vae": p}, z))
    vae_decode = step_bytes(decode.lower(shapes["vae"], z).compile())
    weights = {n: _nbytes(v) for n, v in shapes.items()}
    text = sum(v for n, v in weights.items() if n.startswith("text"))
    peak = max(unet_step + weights["vae"] + text, vae_decode + weights["unet"] + text)
    return {"unet_step": unet_step, "vae_decode": vae_decode, "weights": sum(weights.values()), "peak": peak}


def training(spec) -> dict:
    import importlib.util

    from sd_jax.sharding import make_mesh, rules_for
    from sd_jax.training.loop import Trainer
    from sd_jax.training.trainers import objective_for

    mod_spec = importlib.util.spec_from_file_location("memory_config", spec["config"])
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.sharding = spec["sharding"]
    rules_for(cfg.sharding)
    for k, v in spec.get("overrides", {}).items():
        cfg[k] = v
    if spec.get("image_size"):
        cfg.data.image_size = spec["image_size"]
    comps, shapes = _components(pathlib.Path(spec["folder"]), C.dtype_of(cfg.compute_dtype), jnp.float32,
                                cfg.get("remat_policy"))  # fmt: skip
    trainer = Trainer(cfg, make_mesh(spec["mesh"]), objective_for(cfg)(cfg, comps, shapes))
    n, size = cfg.batch_size, cfg.data.image_size
    batch = {"images": (n, size, size, 3), "input_ids": (n, 77)}
    if comps.sdxl:
        batch.update({"input_ids_2": (n, 77), "original_size": (n, 2), "crop_top_left": (n, 2)})
    from sd_jax.sharding import batch_sharding

    def struct(k, shape):
        ints = k.startswith("input_ids") or k in ("original_size", "crop_top_left")
        return jax.ShapeDtypeStruct(shape, jnp.int32 if ints else jnp.float32,
                                    sharding=batch_sharding(trainer.mesh, len(shape)))  # fmt: skip

    frozen = {k: shapes[k] for k in trainer.frozen_names}
    lowered = trainer._step.lower(trainer.abstract_state, frozen, {k: struct(k, v) for k, v in batch.items()})
    state = _per_device(trainer.abstract_state, trainer.state_sh) + _per_device(frozen, trainer.frozen_sh)
    return {
        "step": step_bytes(lowered.compile()),
        "state": state,
        "batch_per_device": n // (trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]),
    }  # the tensor axis shares its batch


def _per_device(tree, shardings) -> int:
    """Bytes of ``tree`` on one device under ``shardings`` (exact: each leaf's shard shape)."""
    leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    assert len(leaves) == len(shards), (len(leaves), len(shards))
    return sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize for a, sh in zip(leaves, shards))


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps({"sampling": sampling, "training": training}[spec["task"]](spec)))
