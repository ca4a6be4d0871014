"""``python sample.py``: every sampling mode from the command line.

Flags and the checks that need no model are in ``sample_args``, those that need its configs in ``sample_plan``,
file naming in ``sample_output``. Expected errors end with one line ``error: ...``: exit status 2 for usage
(a flag's value), 1 for runtime (a corrupt checkpoint, out of memory). ``--debug`` shows the traceback.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time

import numpy as np

from sd_jax import infotext
from sd_jax.cli import (
    sample_adapters,
    sample_control,
    sample_hires,
    sample_loras,
    sample_params,
    sample_plan,
    sample_refiner,
    sample_xy,
)
from sd_jax.cli.sample_args import TILING, UsageError, build_parser, check_args, lora_arg, read_prompts, save_steps
from sd_jax.cli.sample_output import Writer

PROGRESS_DISABLE = None  # tqdm's: None shows the bar on a terminal only


class Progress:
    """A tqdm bar per batch, advanced by ``pipe.on_step(step, total)`` from the host callback of the loop."""

    def __init__(self, batches: int):
        self.batches, self.bar = batches, None

    def start(self, k: int) -> None:
        from tqdm import tqdm

        self.close()
        desc = f"batch {k + 1}/{self.batches}" if self.batches > 1 else "sampling"
        self.bar = tqdm(desc=desc, unit="step", disable=PROGRESS_DISABLE, file=sys.stderr)

    def __call__(self, step: int, total: int) -> None:
        bar = self.bar
        if bar is None:
            return
        if bar.total != total:
            bar.total = total
        if step > bar.n:  # callbacks are unordered; never go back
            bar.update(step - bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def load_pipeline(args, model: str):
    import jax

    cache = os.environ.get("SD_JAX_CACHE", str(pathlib.Path.home() / ".cache" / "sd_jax" / "jax"))
    if cache:  # SD_JAX_CACHE= (empty) turns the persistent compilation cache off
        jax.config.update("jax_compilation_cache_dir", cache)  # warm starts skip XLA compilation
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from sd_jax.pipelines.pipeline import StableDiffusion

    return StableDiffusion.load(model, dtype=args.dtype, allow_pickle=args.allow_pickle, mesh=args.device_mesh,
                                config_dir=args.config_dir, safety_checker=not args.no_safety_checker,
                                attention=args.attention, conv=args.conv, sharding=args.sharding)  # fmt: skip


def mode_of(args) -> str:
    if args.interpolate is not None:
        return "interpolate"
    if args.upscale:
        return "upscale"
    if args.mask_image:
        return "inpaint"
    if args.denoise:
        return "denoise"
    return "img2img" if args.init_image else "txt2img"


def sample_batch(pipe, args, mode, prompts, seed, plan, inputs):
    """One batch through the pipeline mode; returns (images, per-step x0 or None, extra metadata)."""
    common = dict(negative=args.negative_prompt, steps=args.steps, sampler=args.sampler, schedule=args.schedule,
                  guidance_scale=args.guidance_scale, seed=seed, tiled=TILING[args.vae_tiling])  # fmt: skip
    text = dict(
        guidance_rescale=args.guidance_rescale,
        clip_skip=args.clip_skip,
        **inputs.get("control", {}),
        **inputs.get("adapters", {}),
    )
    if mode == "txt2img" and "refiner" in inputs:
        return sample_refiner.txt2img(pipe, inputs["refiner"], args, prompts, height=plan.height, width=plan.width,
                                      **common, **text)  # fmt: skip
    if mode == "txt2img":
        m = math.gcd(len(prompts), args.micro_batch) if args.micro_batch else None
        if sample_hires.enabled(args):
            return sample_hires.txt2img(pipe, args, prompts, height=plan.height, width=plan.width, micro_batch=m,
                                        **common, **text)  # fmt: skip
        imgs, ds = pipe.txt2img(prompts, height=plan.height, width=plan.width, micro_batch=m,
                                record=args.save_steps is not None, **common, **text)  # fmt: skip
        return imgs, ds, {}
    if mode == "img2img":
        return (*pipe.img2img(prompts, inputs["image"], strength=args.strength, **common, **text), {})
    if mode == "inpaint":
        return (*pipe.inpaint(prompts, inputs["image"], inputs["mask"], masked_content=args.masked_content, **common,
                              **text), {})  # fmt: skip
    if mode == "denoise":
        imgs, extra = pipe.denoise(prompts, inputs["image"], noise_level=args.denoise_level, **common)
        return imgs, None, extra
    if mode == "upscale":
        return (*pipe.upscale(prompts, inputs["image"], noise_level=args.noise_level, **common), {})
    raise AssertionError(mode)


def run(argv) -> None:
    parser = build_parser()
    sample_adapters.add_flags(parser)
    sample_hires.add_flags(parser)
    sample_refiner.add_flags(parser)
    sample_loras.add_flags(parser)
    args = parser.parse_args(argv)
    source = sample_params.apply_image(args, parser, argv) if args.from_image else None
    check_args(args)
    sample_hires.check(args)
    axes = sample_xy.check(args)
    prompts = read_prompts(args)
    tagged = sample_loras.PromptLoras(args, prompts + [args.interpolate or ""])  # <lora:NAME:W>, found now
    loras = [lora_arg(spec) for spec in args.lora]
    at = save_steps(args)
    model = sample_plan.model_path(args)
    mode = mode_of(args)
    embedded = args.model is None and not os.environ.get(sample_plan.DEFAULT_MODEL_ENV)
    control = sample_control.check(args, embedded)
    sample_adapters.check(args, mode in ("txt2img", "img2img", "inpaint"))
    sample_refiner.check(args, model)
    if control is not None and mode == "txt2img" and args.height is None and args.width is None:
        args.height, args.width = sample_control.default_size(control, 8)  # diffusers: the control image's size
    if axes:
        sample_xy.check_prompt(axes, prompts[0], args.negative_prompt)
    configs = sample_plan.read_configs(model, args.config_dir)
    batch = args.frames if mode == "interpolate" else min(args.batch_size, len(prompts))

    def checked_plan(unet, vae, params):
        upscaler = unet.num_class_embeds is not None
        plan = sample_plan.plan_sizes(args, unet, vae, upscaler)
        sample_plan.check_memory(args, unet, vae, plan, batch, upscaler, params)
        return plan

    plan = checked_plan(*configs) if configs else None
    if source is not None:
        sample_params.check_model(source, model)
    pipe = load_pipeline(args, model)
    pipe.emphasis, pipe.max_prompt_chunks = args.emphasis, args.max_prompt_chunks  # sd_jax.pipelines.long_prompts
    if plan is None:  # configs known only now (Hub id, single file): check before sampling
        import jax

        params = sum(a.size for a in jax.tree.leaves(pipe.params))
        plan = checked_plan(pipe.unet.config, pipe.vae.config, params)
    if mode == "upscale" and not pipe.is_upscaler:
        raise UsageError(f"--upscale needs an x4 upscaler model ; {model} is not one (its U-Net has no noise classes)")
    sample_plan.warn_native_size(pipe.unet.config, pipe.vae.config, plan, pipe.is_upscaler)
    if plan.note:
        print(plan.note)
    for path, scale in loras:
        pipe.load_lora(path, scale)
    adapters = sample_adapters.apply(pipe, args)
    if control is not None:
        pipe.load_controlnet([p for p, _ in control.nets], allow_pickle=args.allow_pickle)
    inputs = load_inputs(args, plan)
    inputs["adapters"] = adapters["kwargs"]
    if sample_refiner.enabled(args):
        inputs["refiner"] = sample_refiner.load(args, load_pipeline, pipe)
        sample_refiner.check_loaded(pipe, inputs["refiner"], args, model)
    if control is not None:
        inputs["control"] = sample_control.mode_kwargs(control, sample_control.images(control))

    sampler = args.sampler or getattr(pipe, "default_sampler", "euler")
    shared = sample_params.shared_fields(args, mode=mode, sampler=sampler, plan=plan, model=model, loras=loras,
                                         control=control)  # fmt: skip
    writer = Writer(args.output_dir, args.format)
    keep = source.keep if source is not None else None
    t0 = time.time()
    if axes:
        shared = tagged.use(pipe, prompts[:1], shared)
        grid = sample_xy.run_grid(pipe, args, axes, mode, tagged.text(prompts[:1])[0], plan, inputs, shared, writer,
                                  sample_batch)  # fmt: skip
        print(f"[{mode}] X/Y grid of {len(writer.paths)} image(s) in {time.time() - t0:.1f}s -> {grid}")
        return
    if mode == "interpolate":
        seed_b = (args.seed + 1) % 2**32
        shared = tagged.use(pipe, prompts[:1], shared)
        text_a, text_b = tagged.text([prompts[0], args.interpolate or ""])
        imgs, _ = pipe.interpolate(text_a, text_b or None, frames=args.frames, seed_a=args.seed,
                                   seed_b=seed_b, height=plan.height, width=plan.width, steps=args.steps,
                                   sampler=args.sampler, schedule=args.schedule, guidance_scale=args.guidance_scale,
                                   tiled=TILING[args.vae_tiling])  # fmt: skip
        texts = [infotext.format_infotext(prompts[0], None, sample_params.frame_fields(
            shared, args.seed, seed_b, args.interpolate, args.frames, k)) for k in range(len(imgs))]  # fmt: skip
        frames = range(len(imgs)) if keep is None else [keep]
        writer.add(imgs[list(frames)], [texts[k] for k in frames], [args.seed] * len(frames))
        if keep is None:
            gif = {**shared, "Seed": args.seed, "Variation seed": seed_b, "Frames": args.frames,
                   "Interpolate prompt": args.interpolate or None}  # fmt: skip
            print(f"wrote {writer.gif(imgs, infotext.format_infotext(prompts[0], None, gif))}")
    else:
        chunks = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
        progress = Progress(len(chunks))
        pipe.on_step = progress
        try:
            for k, chunk in enumerate(chunks):
                seed = (args.seed + k) % 2**32
                progress.start(k)
                fields = tagged.use(pipe, chunk, shared)  # the batch's LoRAs: its first prompt's tags
                imgs, ds, extra = sample_batch(pipe, args, mode, tagged.text(chunk), seed, plan, inputs)
                progress.close()
                texts = [infotext.format_infotext(p, args.negative_prompt, sample_params.image_fields(
                    fields, seed, len(chunk), i, extra)) for i, p in enumerate(chunk)]  # fmt: skip
                which = range(len(chunk)) if keep is None else [keep]
                writer.add(np.asarray(imgs)[list(which)], [texts[i] for i in which], [seed] * len(which))
                if at is not None and k == 0:
                    x0 = pipe.decode(np.concatenate([np.asarray(ds[s][:1]) for s in at]), safe=False)
                    text = infotext.format_infotext(chunk[0], args.negative_prompt, {
                        **sample_params.image_fields(fields, seed, len(chunk), 0, extra),
                        "Progression steps": ",".join(map(str, at))})  # fmt: skip
                    print(f"wrote {writer.save_image(np.concatenate(list(x0), axis=1), 'progression', text)} "
                          f"(x0 of the first image at steps {at})")  # fmt: skip
        finally:
            progress.close()
            pipe.on_step = None
    grid = writer.grid()
    print(f"[{mode}] {len(writer.paths)} image(s) in {time.time() - t0:.1f}s -> {writer.out_dir}/"
          + (f" (grid {grid.name})" if grid else ""))  # fmt: skip


def load_inputs(args, plan) -> dict:
    from sd_jax.pipelines import images

    if not args.init_image:
        return {}
    out = {"image": images.load_image(args.init_image, plan.init_size, args.resize_mode)}
    if args.mask_image:
        out["mask"] = images.load_mask(args.mask_image, plan.init_size, args.resize_mode)
    return out


def fail(msg: str, code: int) -> None:
    lines = str(msg).strip().splitlines() or ["(no message)"]
    more = f" ({len(lines) - 1} more lines: rerun with --debug)" if len(lines) > 1 else ""
    print(f"error: {lines[0]}{more}", file=sys.stderr)
    raise SystemExit(code)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    from sd_jax.errors import SDJaxError, UnsafeCheckpointError

    try:
        run(argv)
    except (UsageError, UnsafeCheckpointError) as e:
        if debug:
            raise
        fail(str(e), 2)
    except (SDJaxError, ValueError, OSError, MemoryError) as e:
        if debug:
            raise
        fail(f"{type(e).__name__}: {e}" if isinstance(e, MemoryError) else str(e), 1)
    except KeyboardInterrupt:
        print("error: interrupted ; the images written so far are kept", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        from jax.errors import JaxRuntimeError

        if debug or not isinstance(e, JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        fail(f"out of device memory ({str(e).splitlines()[0][:200]}) ; lower --batch-size, --height/--width, "
             "or use --micro-batch / --vae-tiling on", 1)  # fmt: skip
