"""The pipeline's one jitted sampling loop: guidance around the U-Net, the sampler grid of the folder's scheduler
config, latent-blend inpainting, progress to the host, micro-batches.

``build_loop`` returns ``run(model_params, noise, cond, uncond, scale, rescale, key, x_start, x0, mask)``, jitted
once per :class:`Options` (shapes aside). ``model_params`` is what the pipeline's model function takes
(``{"unet": ...[, "controlnet": (...)]}``). Conditioning with a ``"control"`` entry (ControlNet) also gets
``"step"``, the grid step of each model call, found from its sigma, so per-step weights stay traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from sd_jax.sampling.denoiser import make_denoiser
from sd_jax.sampling.guidance import cfg_model, stack_conditioning
from sd_jax.sampling.registry import Grid, blend_hook, sample
from sd_jax.sampling.scheduler_config import Resolved


@dataclasses.dataclass(frozen=True)
class Options:
    """Static choices: a new combination compiles once, then is reused."""

    sampler: str = "euler"
    steps: int = 20
    schedule: str = "default"  # schedule type of the grid (registry.SCHEDULE_TYPES)
    guidance: bool = True  # False: guidance scale 1, the unconditional pass is skipped
    start: int = 0  # first step (img2img / denoise)
    end: int | None = None  # stop before this step (denoising_end: the SDXL base's part of a refiner handoff)
    blend: bool = False  # masked-latent inpainting with an ordinary U-Net
    record: bool = False  # return each step's x0 estimate
    micro_batch: int | None = None
    controlnets: tuple = ()  # the ControlNets' configs (their modules are traced into the model function)
    interruptible: bool = False  # ask the host before each step whether to stop (the server's interrupt)


def build_loop(model_fn: Callable, plan: tuple[Resolved, Grid], opts: Options, report: Callable,
               stop: Callable | None = None) -> Callable:  # fmt: skip
    """The jitted loop of ``opts``: ``model_fn(model_params) -> model(x, t, cond)``; ``plan`` the resolved
    sampler and its grid; ``report(i)`` runs on the host after each whole step (unordered: the loop never waits
    on it, and what it calls is read when it fires, so changing it needs no recompile). With
    ``opts.interruptible``, ``stop() -> bool`` runs on the host before each step and the loop waits for it (one
    host round trip a step, hence off by default): once it says True, the remaining steps are skipped."""
    resolved, grid = plan
    halt = None
    if opts.interruptible:
        flag = jax.ShapeDtypeStruct((), jnp.bool_)
        halt = lambda i: io_callback(lambda i: np.bool_(stop()), flag, i)  # noqa: E731

    def one(model_params, noise, cond, uncond, scale, rescale, key, x_start, x0, mask):
        model = model_fn(model_params)
        if opts.guidance:
            model = cfg_model(model, scale, rescale)
            c = stack_conditioning(uncond, cond)
        else:
            c = cond
        stepped = "control" in c  # ControlNet: the model needs the step (its keep factor)
        denoise = _stepped(model, resolved, grid, c) if stepped else make_denoiser(model, resolved.schedule, c)
        hook = blend_hook(grid, x0, noise, mask) if opts.blend else None
        after = lambda i: jax.debug.callback(report, i)  # noqa: E731
        return sample(resolved.sampler, denoise, noise, grid, key, hook=hook, after_step=after, record=opts.record,
                      start=opts.start, end=opts.end, x_start=x_start, halt=halt)  # fmt: skip

    def run(model_params, noise, cond, uncond, scale, rescale, key, x_start, x0, mask):
        b = noise.shape[0]
        m = opts.micro_batch
        if not m or m >= b:
            return one(model_params, noise, cond, uncond, scale, rescale, key, x_start, x0, mask)
        if b % m:
            raise ValueError(f"batch {b} is not a multiple of micro_batch {m}")
        split = lambda t: jax.tree.map(lambda a: a.reshape(b // m, m, *a.shape[1:]), t)  # noqa: E731
        keys = key.reshape(b // m, m) if jnp.ndim(key) == 1 else jax.random.split(key, b // m)  # per-row keys stay
        xs = split((noise, cond, uncond, x_start, x0, mask))
        out, ds = jax.lax.map(lambda a: one(model_params, a[0][0], a[0][1], a[0][2], scale, rescale, a[1],
                                            a[0][3], a[0][4], a[0][5]), (xs, keys))  # fmt: skip
        out = out.reshape(b, *out.shape[2:])
        if ds is not None:  # [chunks, steps, m, ...] -> [steps, b, ...]
            ds = jnp.moveaxis(ds, 1, 0).reshape(ds.shape[1], b, *ds.shape[3:])
        return out, ds

    return jax.jit(run)


def _stepped(model, resolved: Resolved, grid: Grid, c: dict):
    """The denoiser with ``c["step"]``, the grid step whose sigma the call is at (sub-steps: the nearest)."""
    sigmas = jnp.asarray(grid.sigmas[:-1], jnp.float32)

    def denoise(x, sigma, t=None):
        step = jnp.argmin(jnp.abs(sigmas - jnp.ravel(jnp.asarray(sigma, jnp.float32))[0])).astype(jnp.int32)
        return make_denoiser(model, resolved.schedule, {**c, "step": step})(x, sigma, t)

    denoise.prediction_type = resolved.schedule.prediction_type
    return denoise
