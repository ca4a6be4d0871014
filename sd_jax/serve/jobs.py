"""A checked request becomes a :class:`Job`: one :class:`Row` per image (prompt, negative prompt, seed) and the
:class:`Spec` the compiled loop needs. Jobs with equal specs share a batch (:mod:`sd_jax.serve.batches`).

Every check runs here, before a job is queued, so a request that fails never reaches the device: each failure
is a :class:`FieldError` naming the field, which the app answers with a 422 in FastAPI's error shape.

Seeds follow A1111: ``seed=-1`` draws one, and image ``i`` of the request (over ``batch_size * n_iter``) gets
``seed + i``. Each image is drawn from its own seed alone (its start noise and, for stochastic samplers, one key
per row), so an image is the same whether its request ran alone or batched, and the same as
``pipe.txt2img(prompt, seed=seed + i)``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import secrets
import time
import uuid

from sd_jax import extra_networks
from sd_jax import infotext as it
from sd_jax.serve.fields import FieldError, Limits
from sd_jax.serve.schemas import MAX_SEED, Img2ImgRequest, Processing, Txt2ImgRequest

SAME = ("", None, "Use same checkpoint", "Use same sampler", "Use same scheduler")  # A1111's "no change" values
CLIP_SKIP_KEY = "CLIP_stop_at_last_layers"  # A1111's option: 1 = the last layer, 2 = diffusers' clip_skip=1


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the compiled loop of a batch needs: requests with equal specs are batched together."""

    model: str
    mode: str  # txt2img, img2img or inpaint
    height: int
    width: int
    steps: int
    sampler: str
    schedule: str
    cfg: float
    strength: float | None
    clip_skip: int | None
    chunks: int  # prompt chunks (75 tokens each): prompts of other lengths would be padded, changing them
    alone: str | None = None  # the task id of a job that runs by itself (hires fix, ControlNet)
    loras: tuple = ()  # the prompt's <lora:...> tags resolved: (path, te weight, unet weight), merged per batch


@dataclasses.dataclass
class Row:
    prompt: str  # as sent, <lora:...> tags included (the infotext keeps them, as A1111's)
    negative: str
    seed: int

    @property
    def text(self) -> str:
        """The prompt the text encoder sees: without its extra-network tags."""
        return extra_networks.parse(self.prompt)[0]


@dataclasses.dataclass
class Job:
    kind: str  # the endpoint: txt2img or img2img
    spec: Spec
    rows: list[Row]
    parameters: dict  # the request as sent, echoed back as A1111 does
    inputs: dict  # decoded images ([H, W, 3] floats), mask, ControlNet and hires-fix arguments
    task_id: str
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None
    step: int = 0
    total: int = 0
    cancelled: bool = False  # the client went away: skip it if queued, drop the result if running

    @property
    def size(self) -> int:
        return len(self.rows)


def _refuse_unsupported(req: Processing) -> None:
    if req.restore_faces:
        raise FieldError("restore_faces", "restore_faces is not supported by sd-jax (no face restorer) ; send false")
    if req.tiling:
        raise FieldError("tiling", "tiling is not supported by sd-jax ; send false")
    if req.styles:
        raise FieldError("styles", "styles are not supported by sd-jax (no saved styles) ; put the text in prompt")
    if req.subseed_strength:
        raise FieldError("subseed_strength", "variation seeds are not supported by the server ; send 0")
    if req.script_name:
        raise FieldError("script_name", f"script {req.script_name!r} is not available ; sd-jax runs no scripts")
    if req.refiner_checkpoint not in SAME:
        raise FieldError("refiner_checkpoint", "a refiner per request is not supported by the server ; leave it "
                                               "unset")  # fmt: skip
    for k in req.alwayson_scripts:
        if k.lower() != "controlnet":
            raise FieldError(f"alwayson_scripts.{k}", f"alwayson script {k!r} is not available ; only ControlNet")


def sampler_and_schedule(pipe, req: Processing) -> tuple[str, str]:
    name = req.sampler_name or req.sampler_index
    try:
        sampler, implied = it.sampler_from_a1111(name)
    except it.InfotextError as e:
        raise FieldError("sampler_name", str(e).replace(" (or pass --sampler)", "")) from None
    if req.scheduler in (None, "", "automatic", "Automatic"):
        schedule = implied or "default"
    else:
        try:
            schedule = it.schedule_from_a1111(req.scheduler)
        except it.InfotextError as e:
            raise FieldError("scheduler", str(e)) from None
    try:
        pipe.plan(sampler, req.steps, schedule)
    except ValueError as e:
        raise FieldError("sampler_name", f"{name} with {req.steps} steps: {e}") from None
    return sampler, schedule


def clip_skip(value) -> int | None:
    """A1111's ``CLIP_stop_at_last_layers`` (1..12) as diffusers' ``clip_skip`` (None for 1), or a FieldError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
        raise FieldError(f"override_settings.{CLIP_SKIP_KEY}", f"{CLIP_SKIP_KEY}={value!r} is not a whole number "
                                                               "in [1, 12]")  # fmt: skip
    return None if value == 1 else value - 1


def _chunks(pipe, prompt: str, negative: str) -> int:
    from sd_jax.pipelines import long_prompts as LP

    try:
        return LP.tokenize_chunks(pipe.components, [prompt, negative], pipe.max_prompt_chunks)[0].count
    except LP.PromptTooLongError as e:
        raise FieldError("prompt", str(e).replace(" (--max-prompt-chunks N, pipe.max_prompt_chunks)", "")) from None


def seeds(seed: int, n: int) -> list[int]:
    """A1111's seeds of a request's ``n`` images: ``seed`` (-1: a random one) then one more per image."""
    first = secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed
    return [(first + i) % (MAX_SEED + 1) for i in range(n)]


def check_size(pipe, req: Processing, limits: Limits) -> None:
    f = pipe.vae_scale_factor
    for name in ("width", "height"):
        v = getattr(req, name)
        if v > limits.max_size:
            raise FieldError(name, f"{name}={v} is larger than the server's --max-size {limits.max_size}")
        if v % 8 or v % f:
            raise FieldError(name, f"{name}={v} is not a multiple of 8 (and of the VAE factor {f})")


def prompt_loras(prompt: str, lora_dir) -> tuple[str, tuple]:
    """The prompt without its ``<lora:...>`` tags, and the LoRA files they name (:mod:`sd_jax.extra_networks`)."""
    try:
        text, tags = extra_networks.parse(prompt)
        return text, extra_networks.resolve(tags, lora_dir)
    except extra_networks.ExtraNetworkError as e:
        raise FieldError("prompt", str(e).replace("pass --lora-dir DIR", "start the server with --lora-dir DIR")
                         .replace("GET /sdapi/v1/loras or ls", "GET /sdapi/v1/loras")) from None  # fmt: skip


def make_job(pipe, model: str, kind: str, req: Txt2ImgRequest | Img2ImgRequest, options: dict,
             limits: Limits, control_nets: dict, lora_dir=None) -> Job:  # fmt: skip
    """Check ``req`` against the loaded pipeline and the server's limits; the :class:`Job` to queue."""
    _refuse_unsupported(req)
    n = req.batch_size * req.n_iter
    if n > limits.max_images:
        field = "batch_size" if req.batch_size > limits.max_images else "n_iter"
        raise FieldError(field, f"batch_size * n_iter = {n} images, more than the server's --max-images "
                                f"{limits.max_images} per request ; send fewer")  # fmt: skip
    wanted = req.override_settings.get("sd_model_checkpoint")
    if wanted not in (None, *SAME) and wanted not in options.get("_model_names", ()):
        raise FieldError("override_settings.sd_model_checkpoint", f"model {wanted!r} is not the loaded one ; switch "
                                                                  "with POST /sdapi/v1/options first")  # fmt: skip
    check_size(pipe, req, limits)
    sampler, schedule = sampler_and_schedule(pipe, req)
    text, loras = prompt_loras(req.prompt, lora_dir)
    chunks = _chunks(pipe, text, req.negative_prompt)
    task_id = req.force_task_id or f"task({uuid.uuid4().hex[:15]})"
    inputs: dict = {}
    mode, strength = "txt2img", None
    if kind == "img2img":
        from sd_jax.serve.inputs import img2img_inputs

        inputs = img2img_inputs(pipe, req, limits)
        mode, strength = ("inpaint" if "mask" in inputs else "img2img"), req.denoising_strength
    elif req.enable_hr:
        from sd_jax.serve.inputs import hires_inputs

        inputs["hires"] = hires_inputs(req)
    control = req.alwayson_scripts.get("ControlNet") or req.alwayson_scripts.get("controlnet")
    if control:
        from sd_jax.serve.inputs import control_inputs

        inputs.update(control_inputs(control, control_nets, limits))
    skip = clip_skip(req.override_settings.get(CLIP_SKIP_KEY, options.get(CLIP_SKIP_KEY, 1)))
    alone = task_id if ("hires" in inputs or "control" in inputs) else None
    spec = Spec(model=model, mode=mode, height=req.height, width=req.width, steps=req.steps, sampler=sampler,
                schedule=schedule, cfg=float(req.cfg_scale), strength=strength, clip_skip=skip,
                chunks=chunks, alone=alone, loras=loras)  # fmt: skip
    rows = [Row(req.prompt, req.negative_prompt, s) for s in seeds(req.seed, n)]
    params = req.model_dump(exclude={"init_images", "mask"}) if kind == "img2img" else req.model_dump()
    return Job(kind=kind, spec=spec, rows=rows, parameters=params, inputs=inputs, task_id=task_id)
