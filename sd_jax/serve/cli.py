"""``python -m sd_jax.serve``: flags, the checks that need no model, loading, warm-up, then uvicorn.

The model flags are sample.py's (``--model``, ``--dtype``, ``--lora``, ``--embedding``, ``--controlnet``,
``--config-dir``, ``--allow-pickle``, ``--no-safety-checker``); the rest are the server's. It binds to 127.0.0.1;
``--listen`` (0.0.0.0) needs ``--api-auth USER:PASS`` or an explicit ``--insecure``. A bad flag is one line and
status 2, a failure at start-up one line and status 1 (tracebacks with ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import socket
import sys
import time

from sd_jax.cli.sample_args import Formatter, Parser, UsageError, add_device_flags, device_mesh, lora_arg, positive_int

log = logging.getLogger("sd_jax.serve")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sd_jax.serve", formatter_class=Formatter,
               description="An AUTOMATIC1111-compatible HTTP API (/sdapi/v1) and a web page, batching concurrent "
                           "requests into one sharded, jitted call.")  # fmt: skip
    m = p.add_argument_group("model (as sample.py)")
    m.add_argument("--model", help="diffusers folder, single .safetensors file or Hub id (default: the embedded model)")
    m.add_argument("--models-dir", help="folder of checkpoints clients may switch to (POST /sdapi/v1/options)")
    m.add_argument("--config-dir", help="diffusers folder with the configs of a single file (as sample.py)")
    m.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (they can run code)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="U-Net and text encoder dtype")
    add_device_flags(m)
    m.add_argument("--no-safety-checker", action="store_true", help="skip the checkpoint's safety checker")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a LoRA; repeatable")
    m.add_argument("--lora-dir", metavar="DIR", help="LoRAs prompts name as <lora:NAME:WEIGHT>, merged per batch "
                                                     "(default: MODELS_DIR/Lora if it exists)")  # fmt: skip
    m.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="a textual-inversion embedding; repeatable")  # fmt: skip
    m.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="load a ControlNet; a ControlNet unit's model names it by its folder/file name")  # fmt: skip
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=positive_int, default=7860, help="port")
    s.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (needs --api-auth or --insecure)")
    s.add_argument("--api-auth", metavar="USER:PASS", help="HTTP basic credentials every route asks for")
    s.add_argument("--insecure", action="store_true", help="allow --listen without --api-auth")
    s.add_argument("--max-batch", type=positive_int, default=8, help="images per batched call (a power of two)")
    s.add_argument(
        "--batch-window-ms",
        type=float,
        default=100.0,
        help="the longest a request waits for companions (only while fewer rows are queued than "
        "were active at a recent batch's end)",
    )
    s.add_argument("--queue-size", type=positive_int, default=64, help="requests queued or running before 503")
    s.add_argument("--max-size", type=positive_int, default=2048, help="largest width/height a request may ask")
    s.add_argument("--max-images", type=positive_int, default=64, help="largest batch_size * n_iter per request")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body")
    s.add_argument("--warmup", action="append", default=[], metavar="WxH[:STEPS[:SAMPLER]]",
                   help="compile this txt2img shape (each batch bucket) before the port opens; repeatable")  # fmt: skip
    s.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return p


def parse_warmup(spec: str) -> tuple[int, int, int, str]:
    size, _, rest = spec.partition(":")
    steps, _, sampler = rest.partition(":")
    try:
        w, h = (int(v) for v in size.lower().split("x"))
        return w, h, int(steps) if steps else 20, sampler or "Euler a"
    except ValueError:
        raise UsageError(f"--warmup {spec}: write WxH[:STEPS[:SAMPLER]], e.g. 512x512:20:Euler a") from None


def check_args(args) -> None:
    args.device_mesh = device_mesh(args)
    if args.listen:
        args.host = "0.0.0.0"
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_auth or args.insecure):
        raise UsageError(f"--host {args.host} exposes the API beyond this machine ; add --api-auth USER:PASS (or "
                         "--insecure to do it without)")  # fmt: skip
    if args.api_auth and ":" not in args.api_auth:
        raise UsageError("--api-auth takes USER:PASS")
    if args.max_batch & (args.max_batch - 1):
        raise UsageError(f"--max-batch {args.max_batch} is not a power of two ; use 1, 2, 4, 8, 16, ...")
    if args.models_dir and not pathlib.Path(args.models_dir).is_dir():
        raise UsageError(f"--models-dir {args.models_dir}: no such folder")
    if args.lora_dir is None and args.models_dir and (pathlib.Path(args.models_dir) / "Lora").is_dir():
        args.lora_dir = str(pathlib.Path(args.models_dir) / "Lora")  # A1111's models/Lora
    if args.lora_dir is not None and not pathlib.Path(args.lora_dir).is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir}: no such folder")
    for spec in args.controlnet + [e.rpartition(":")[0] or e for e in args.embedding]:
        if not pathlib.Path(spec).exists():
            raise UsageError(f"{spec}: no such file or folder")
    args.warmups = [parse_warmup(w) for w in args.warmup]
    args.loras = [lora_arg(spec) for spec in args.lora]
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise UsageError(f"--port {args.port}: cannot bind {args.host}:{args.port} ({e.strerror}) ; pick a free "
                             "port") from None  # fmt: skip


def loader(args, mesh, should_stop=None):
    """``path -> pipeline`` with the flags' dtype, LoRAs, embeddings and ControlNets (start-up and switches);
    ``should_stop`` becomes the pipeline's, so its loops (warm-up included) compile interruptible."""
    from sd_jax.pipelines.pipeline import StableDiffusion

    def load(path):
        pipe = StableDiffusion.load(path, dtype=args.dtype, allow_pickle=args.allow_pickle, mesh=mesh,
                                    config_dir=args.config_dir, safety_checker=not args.no_safety_checker,
                                    controlnet=args.controlnet or None, attention=args.attention, conv=args.conv,
                                    sharding=args.sharding)  # fmt: skip
        for lora, scale in args.loras:
            pipe.load_lora(lora, scale)
        args.embedded_tokens = {}
        for spec in args.embedding:
            tokens = pipe.load_textual_inversion(spec, allow_pickle=args.allow_pickle)
            args.embedded_tokens[tokens[0] if tokens else spec] = tokens
        pipe.should_stop = should_stop
        return pipe

    return load


def build_state(args):
    from sd_jax.cli.sample_plan import model_path
    from sd_jax.serve import catalog
    from sd_jax.serve.app import ServerState
    from sd_jax.serve.batcher import Batcher
    from sd_jax.serve.jobs import Limits

    model = model_path(args)
    checkpoints = catalog.scan(model, args.models_dir)

    def should_stop() -> bool:  # the batcher's interrupt, asked by the running loop before each step
        return state.batcher is not None and state.batcher.should_stop()

    load = loader(args, args.device_mesh, should_stop)
    t0 = time.time()
    pipe = load(model)
    log.info("loaded %s in %.1fs", model, time.time() - t0)
    nets = {pathlib.Path(p.rstrip("/")).stem: p for p in args.controlnet}
    state = ServerState(pipe=pipe, model=model, checkpoints=checkpoints, load=load, loras=args.loras,
                        lora_dir=args.lora_dir, embeddings=getattr(args, "embedded_tokens", {}), controlnets=nets,
                        limits=Limits(max_size=args.max_size, max_images=args.max_images))  # fmt: skip
    warm(state, args.warmups, args.max_batch)
    state.batcher = Batcher(state, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                            queue_size=args.queue_size)  # fmt: skip
    return state


def warm(state, shapes, max_batch: int) -> None:
    """Compile each warm-up shape at every batch bucket (1, 2, 4, ... max_batch) by running it once."""
    from sd_jax.serve.batches import run_batch
    from sd_jax.serve.jobs import make_job
    from sd_jax.serve.schemas import Txt2ImgRequest

    for w, h, steps, sampler in shapes:
        b = 1
        while b <= max_batch:
            t0 = time.time()
            req = Txt2ImgRequest(width=w, height=h, steps=steps, sampler_name=sampler, batch_size=b, seed=0)
            run_batch(state.pipe, [make_job(state.pipe, state.model, "txt2img", req, state.options,
                                            state.limits, state.controlnets)], max_batch)  # fmt: skip
            log.info("warm-up %dx%d, %d steps, %s, batch %d: %.1fs", w, h, steps, sampler, b, time.time() - t0)
            b *= 2


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from sd_jax.errors import SDJaxError
    from sd_jax.serve.jobs import FieldError

    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        state = build_state(args)
    except UsageError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (SDJaxError, FieldError, ValueError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    import uvicorn

    from sd_jax.serve.app import create_app

    app = create_app(state, api_auth=args.api_auth, max_body_mb=args.max_body_mb)
    log.info("serving %s on http://%s:%d", state.current.title, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        state.batcher.close()
