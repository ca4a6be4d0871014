"""The FastAPI app: A1111's ``/sdapi/v1`` routes over a :class:`ServerState`, ``/health``, and the web page at ``/``.

Errors keep FastAPI's shape: a wrong type, an out-of-range value or a check of :mod:`sd_jax.serve.jobs` is a 422
whose ``detail`` names the field; a full queue is a 503 with ``Retry-After``; a body over ``--max-body-mb`` a 413.
With ``--api-auth`` every route asks for HTTP basic credentials, as A1111's ``--api-auth`` does.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib.resources
import io
import logging
import secrets
import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from sd_jax import infotext as it
from sd_jax.serve import catalog
from sd_jax.serve.batcher import Batcher, QueueFull
from sd_jax.serve.fields import FieldError, Limits
from sd_jax.serve.jobs import CLIP_SKIP_KEY, clip_skip, make_job
from sd_jax.serve.schemas import Img2ImgRequest, PNGInfoRequest, ProgressRequest, Txt2ImgRequest

log = logging.getLogger("sd_jax.serve")


@dataclasses.dataclass
class ServerState:
    """What the routes share: the pipeline (owned by the batcher's worker), the checkpoints, options, limits."""

    pipe: object
    model: str  # the loaded checkpoint's path (or Hub id)
    checkpoints: list
    load: object  # path -> pipeline, for model switches (the CLI's loader, with its LoRAs/ControlNets)
    limits: Limits = dataclasses.field(default_factory=Limits)
    options: dict = dataclasses.field(default_factory=lambda: {CLIP_SKIP_KEY: 1, "samples_format": "png"})
    loras: list = dataclasses.field(default_factory=list)  # (path, scale) merged at start-up
    lora_dir: str | None = None  # where prompts' <lora:NAME> tags are looked up (--lora-dir)
    embeddings: dict = dataclasses.field(default_factory=dict)  # name -> tokens
    controlnets: dict = dataclasses.field(default_factory=dict)  # unit model name -> path, in load order
    status: str = "ready"  # or "loading" (a model switch)
    batcher: Batcher | None = None

    @property
    def current(self):
        """The loaded checkpoint's listing entry (hashed once, by catalog.scan)."""
        return next(c for c in self.checkpoints if c.path == self.model)


class BodyLimit:
    """A plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the routes):
    a declared body over the limit is a 413 before it is read, a streamed one once it passes the limit."""

    def __init__(self, app, limit: int, mb: float):
        self.app, self.limit, self.mb = app, limit, mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            msg = f"request body of {int(declared)} bytes is over the server's --max-body-mb {self.mb:g}"
            return await JSONResponse({"detail": msg}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over the server's --max-body-mb {self.mb:g}")
            return message

        await self.app(scope, limited, send)


def field_error(e: FieldError) -> HTTPException:
    loc = ["body", *e.field.split(".")]
    return HTTPException(422, detail=[{"type": "value_error", "loc": loc, "msg": str(e), "input": None}])


def _auth(credentials: str | None):
    if not credentials:
        return []
    user, _, password = credentials.partition(":")
    basic = Depends(HTTPBasic())

    def check(c: HTTPBasicCredentials = basic):
        if not (secrets.compare_digest(c.username, user) and secrets.compare_digest(c.password, password)):
            raise HTTPException(401, "incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def create_app(state: ServerState, *, api_auth: str | None = None, max_body_mb: float = 64.0) -> FastAPI:
    app = FastAPI(title="sd-jax", dependencies=_auth(api_auth))
    app.add_middleware(BodyLimit, limit=int(max_body_mb * 2**20), mb=max_body_mb)

    async def generate(kind: str, req, request: Request):
        if req.model_extra:
            log.warning("%s: ignored unknown field(s) %s", kind, ", ".join(sorted(req.model_extra)))
        opts = {**state.options, "_model_names": {state.current.title, state.current.name}}
        try:
            job = make_job(state.pipe, state.model, kind, req, opts, state.limits, state.controlnets, state.lora_dir)
        except FieldError as e:
            raise field_error(e) from None
        except ValueError as e:  # a check of the pipeline's own (sizes, images, ControlNet arguments)
            raise HTTPException(422, detail=[{"type": "value_error", "loc": ["body"], "msg": str(e)}]) from None
        try:
            fut = state.batcher.submit(job)
        except QueueFull as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "2"}) from None
        wrapped = asyncio.wrap_future(fut)
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                state.batcher.cancel(job)
                log.info("%s: client went away; %s dropped", kind, job.task_id)
                return JSONResponse({"detail": "client disconnected"}, status_code=499)
        try:
            return JSONResponse(wrapped.result())
        except asyncio.CancelledError:
            return JSONResponse({"detail": "cancelled"}, status_code=499)
        except Exception as e:  # noqa: BLE001 - the batch failed: this request's error, the server goes on
            raise HTTPException(500, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generate("txt2img", req, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generate("img2img", req, request)

    @app.get("/health")
    def health():
        return {"status": state.status, "model": state.current.title, "queued": state.batcher.queued()}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [c.entry() for c in state.checkpoints]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh():
        return None

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return catalog.samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return catalog.schedulers()

    @app.get("/sdapi/v1/loras")
    def loras():
        return catalog.loras(state.loras, state.lora_dir)

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():  # the folder is listed afresh on every GET /sdapi/v1/loras
        return None

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return catalog.embeddings(state.embeddings)

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        from sd_jax.pipelines.hires import UPSCALERS

        return [{"name": u.name, "model_name": None, "model_path": None, "model_url": None, "scale": 2}
                for u in UPSCALERS.values()]  # fmt: skip

    @app.get("/sdapi/v1/options")
    def get_options():
        cur = state.current
        return {**state.options, "sd_model_checkpoint": cur.title, "sd_checkpoint_hash": cur.hash}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(422, detail=[{"type": "json_invalid", "loc": ["body"], "msg": "not JSON"}]) from None
        if not isinstance(body, dict):
            raise HTTPException(422, detail=[{"type": "dict_type", "loc": ["body"], "msg": "send a JSON object"}])
        try:
            if CLIP_SKIP_KEY in body:
                clip_skip(body[CLIP_SKIP_KEY])
            wanted = body.get("sd_model_checkpoint")
            target = None if wanted is None else catalog.pick(state.checkpoints, wanted)
        except FieldError as e:
            raise field_error(e) from None
        for k, v in body.items():
            if k not in ("sd_model_checkpoint", CLIP_SKIP_KEY, "samples_format"):
                log.warning("options: %s is not an option sd-jax has; ignored", k)
            elif k != "sd_model_checkpoint":
                state.options[k] = v
        if target is not None and target.path != state.model:
            await asyncio.wrap_future(state.batcher.call(lambda: switch(target)))
        return None

    def switch(target):
        state.status = "loading"
        try:
            t0 = time.time()
            state.pipe, state.model = state.load(target.path), target.path
            log.info("switched to %s in %.1fs", target.title, time.time() - t0)
        finally:
            state.status = "ready"

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        b = state.batcher
        running = list(b.running)
        frac = b.step / b.total if running and b.total else 0.0
        elapsed = time.monotonic() - b.batch_started if running and b.batch_started else 0.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {"progress": frac, "eta_relative": eta, "current_image": None, "textinfo": None,
                "current_task": running[0].task_id if running else None,
                "state": {"skipped": False, "interrupted": b.interrupt_flag, "stopping_generation": False,
                          "job": running[0].task_id if running else "", "job_count": len(running) + b.queued(),
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": b.done_count,
                          "sampling_step": b.step if running else 0,
                          "sampling_steps": b.total if running else 0}}  # fmt: skip

    @app.post("/internal/progress")
    def task_progress(req: ProgressRequest):
        where, job = state.batcher.find(req.id_task)
        active, queued = where == "running", where == "queued"
        frac = job.step / job.total if active and job.total else 0.0
        return {"active": active, "queued": queued, "completed": where is None, "progress": frac, "eta": None,
                "live_preview": None, "id_live_preview": -1, "textinfo": "In queue..." if queued else None}  # fmt: skip

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        state.batcher.interrupt()
        return None

    @app.post("/sdapi/v1/skip")
    def skip():
        state.batcher.interrupt()
        return None

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PNGInfoRequest):
        from sd_jax.pnginfo import read_parameters
        from sd_jax.serve.fields import decode_image

        try:
            img = decode_image(req.image, "image", state.limits)
        except FieldError as e:
            raise field_error(e) from None
        text = read_parameters(io.BytesIO(base64.b64decode(req.image.split(",", 1)[-1]))) or ""
        items = {k: v for k, v in img.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": text, "items": items, "parameters": it.parse_infotext(text) if text else {}}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return importlib.resources.files("sd_jax.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    return app
