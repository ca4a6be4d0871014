"""Running jobs: several jobs of one :class:`~sd_jax.serve.jobs.Spec` as one call of the pipeline's one generate
path, and each job's A1111 response.

A batch is every row of its jobs, one :class:`~sd_jax.pipelines.starts.Start` per row drawn from that row's own
seed, joined (:func:`sd_jax.pipelines.starts.concat`) and padded to a bucket size (powers of two up to
``--max-batch``) by repeating the last row, so few shapes compile; ``generate`` shards it over the mesh's data
axis. The sampler gets one key per row. Jobs that run alone (the hires fix, ControlNet) go through the public
modes, one image at a time with its seed.
"""

from __future__ import annotations

import base64
import io
import json
import time

import jax.numpy as jnp
import numpy as np

from sd_jax import extra_networks, hashing
from sd_jax import infotext as it
from sd_jax.pipelines import masked_content as MC
from sd_jax.pipelines import starts as S
from sd_jax.pipelines.modes import seed_keys


def bucket(n: int, max_batch: int) -> int:
    """The compiled batch size ``n`` rows are padded to: the next power of two, at most ``max_batch``."""
    b = 1
    while b < n:
        b *= 2
    return max(n, min(b, max_batch))


def _row_start(pipe, job, k: int, key, grid):
    spec, inp = job.spec, job.inputs
    if spec.mode == "txt2img":
        start = S.txt2img(pipe, key, 1, spec.height, spec.width)
    else:
        image = inp["images"][k % len(inp["images"])]
        if spec.mode == "inpaint":
            start = S.inpaint(pipe, key, 1, image, inp["mask"], grid, spec.strength,
                              masked_content=inp["masked_content"])  # fmt: skip
        else:
            start = S.img2img(pipe, key, 1, image, grid, spec.strength)
    return S.micro_conditioning(pipe, start)


def run_batch(pipe, jobs: list, max_batch: int) -> list[list[np.ndarray]]:
    """The images ([H, W, 3] floats in [0, 1]) of each job, in order; all jobs share one spec."""
    spec = jobs[0].spec
    if spec.alone is not None:
        return [_run_alone(pipe, jobs[0])]
    grid = None if spec.mode == "txt2img" else pipe._grid(spec.sampler, spec.steps, spec.schedule)
    parts, keys, prompts, negatives = [], [], [], []
    for job in jobs:
        for k, row in enumerate(job.rows):
            key, sample_key = seed_keys(row.seed)
            parts.append(_row_start(pipe, job, k, key, grid))
            keys.append(sample_key)
            prompts.append(row.text)
            negatives.append(row.negative)
    n = len(parts)
    pad = bucket(n, max_batch) - n
    parts, keys = parts + parts[-1:] * pad, keys + keys[-1:] * pad
    prompts, negatives = prompts + prompts[-1:] * pad, negatives + negatives[-1:] * pad
    images, _ = pipe.generate(S.concat(parts), prompts, negatives, steps=spec.steps, sampler=spec.sampler,
                              schedule=spec.schedule, guidance_scale=spec.cfg, clip_skip=spec.clip_skip,
                              key=jnp.stack(keys))  # fmt: skip
    images = np.asarray(images)[:n]
    out, i = [], 0
    for job in jobs:
        out.append(overlay(job, list(images[i : i + job.size])))
        i += job.size
    return out


def overlay(job, images: list[np.ndarray]) -> list[np.ndarray]:
    """Inpainting as A1111 returns it: the original pixels pasted back outside the (blurred) mask."""
    if job.spec.mode != "inpaint":
        return images
    full = job.inputs.get("full_res")
    if full is None:
        m, init = job.inputs["mask"], job.inputs["images"]
        return [m * img + (1 - m) * init[k % len(init)] for k, img in enumerate(images)]
    # "Only masked": the sampled box, fitted back to its place in the image at its own size, then the overlay
    from sd_jax.pipelines.images import resize_array

    (x0, y0, x1, y1), m, init = full["box"], full["mask"], full["images"]
    out = []
    for k, img in enumerate(images):
        canvas = init[k % len(init)].copy()
        canvas[y0:y1, x0:x1] = resize_array(img, (x1 - x0, y1 - y0))
        out.append(m * canvas + (1 - m) * init[k % len(init)])
    return out


def _run_alone(pipe, job) -> list[np.ndarray]:
    spec, inp = job.spec, job.inputs
    common = dict(steps=spec.steps, sampler=spec.sampler, schedule=spec.schedule, guidance_scale=spec.cfg,
                  clip_skip=spec.clip_skip, **inp.get("control", {}))  # fmt: skip
    out = []
    for k, row in enumerate(job.rows):
        kw = dict(common, negative=row.negative, seed=row.seed)
        if "hires" in inp:
            imgs, info = pipe.hires_fix(row.text, height=spec.height, width=spec.width, **inp["hires"], **kw)
            job.inputs["hires_info"] = info.get("infotext", {})
        elif spec.mode == "txt2img":
            imgs, _ = pipe.txt2img(row.text, height=spec.height, width=spec.width, **kw)
        elif spec.mode == "inpaint":
            image = inp["images"][k % len(inp["images"])]
            imgs, _ = pipe.inpaint(row.text, image, inp["mask"], strength=spec.strength,
                                   masked_content=inp["masked_content"], **kw)  # fmt: skip
        else:
            image = inp["images"][k % len(inp["images"])]
            imgs, _ = pipe.img2img(row.text, image, strength=spec.strength, **kw)
        out.append(np.asarray(imgs)[0])
    return overlay(job, out)


def _fields(job, seed: int, model: dict, size: tuple[int, int]) -> dict:
    from sd_jax.cli.sample_params import version

    spec = job.spec
    f = {"Steps": spec.steps, "Sampler": it.sampler_to_a1111(spec.sampler),
         "Schedule type": it.schedule_to_a1111(spec.schedule, spec.sampler), "CFG scale": spec.cfg, "Seed": seed,
         "Size": f"{size[1]}x{size[0]}", **model}  # fmt: skip
    if spec.strength is not None:
        f["Denoising strength"] = spec.strength
    if spec.clip_skip:
        f["Clip skip"] = spec.clip_skip + 1
    if "mask_blur" in job.inputs:
        f["Mask blur"] = job.inputs["mask_blur"]
    if job.inputs.get("masked_content", "original") != "original":
        f["Masked content"] = MC.LABELS[job.inputs["masked_content"]]
    if "full_res" in job.inputs:
        f["Inpaint area"], f["Masked area padding"] = "Only masked", job.inputs["full_res"]["padding"]
    f.update(job.inputs.get("hires_info", {}))
    if spec.mode == "inpaint":
        f["Mode"] = "inpaint"
    f["Version"] = version()
    return f


def encode_png(image: np.ndarray, text: str | None) -> str:
    from sd_jax.cli.sample_output import write_image
    from sd_jax.pipelines.images import to_uint8

    buf = io.BytesIO()
    write_image(to_uint8(image), buf, text, "png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response(job, images: list[np.ndarray], model: str, interrupted: bool = False) -> dict:
    """A1111's ``TextToImageResponse``/``ImageToImageResponse``: base64 PNGs with their infotext, the request's
    parameters, and ``info``, a JSON string (``seed``, ``all_seeds``, ``infotexts``, ...)."""
    spec = job.spec
    size = (spec.height, spec.width)  # A1111 records the first pass's size; the hires fix adds its own keys
    names = {"Model hash": hashing.model_hash(model), "Model": hashing.model_name(model)}  # once, not per image
    if spec.loras:  # as A1111's Lora extension: each tag's name and its file's hash
        tags = extra_networks.parse(job.rows[0].prompt)[1]
        names["Lora hashes"] = it.format_hashes(
            (t.name, hashing.lora_hash(p)) for t, (p, _, _) in zip(tags, spec.loras)
        )
    texts = [it.format_infotext(r.prompt, r.negative or None, _fields(job, r.seed, names, size))
             for r in job.rows[: len(images)]]  # fmt: skip
    seeds = [r.seed for r in job.rows]
    info = {
        "prompt": job.rows[0].prompt, "all_prompts": [r.prompt for r in job.rows],
        "negative_prompt": job.rows[0].negative, "all_negative_prompts": [r.negative for r in job.rows],
        "seed": seeds[0], "all_seeds": seeds, "subseed": seeds[0], "all_subseeds": seeds, "subseed_strength": 0,
        "width": int(size[1]), "height": int(size[0]), "sampler_name": it.sampler_to_a1111(spec.sampler),
        "scheduler": it.schedule_to_a1111(spec.schedule, spec.sampler), "cfg_scale": spec.cfg, "steps": spec.steps,
        "batch_size": job.parameters.get("batch_size", 1), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": names["Model"], "sd_model_hash": names["Model hash"], "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": spec.strength if spec.strength is not None else job.parameters.get("denoising_strength"),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": (spec.clip_skip or 0) + 1,
        "is_using_inpainting_conditioning": spec.mode == "inpaint", "version": texts and it.parse_infotext(
            texts[0]).get("Version"), "task_id": job.task_id, "interrupted": interrupted,
    }  # fmt: skip
    send = job.parameters.get("send_images", True)
    return {"images": [encode_png(img, t) for img, t in zip(images, texts)] if send else [],
            "parameters": job.parameters, "info": json.dumps(info)}  # fmt: skip
