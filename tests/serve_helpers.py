"""A real sd-jax server on 127.0.0.1 for the serve tests: uvicorn in a thread of the test process, on a free port,
over the embedded model or a fixture (``python -m sd_jax.serve`` builds the same state from its flags)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*flags: str):
    """Yields ``(base_url, state)`` of a server started with ``python -m sd_jax.serve`` flags ``flags``."""
    import uvicorn

    from sd_jax.serve import cli
    from sd_jax.serve.app import create_app

    port = free_port()
    args = cli.build_parser().parse_args(["--port", str(port), *flags])
    cli.check_args(args)
    state = cli.build_state(args)
    app = create_app(state, api_auth=args.api_auth, max_body_mb=args.max_body_mb)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.batcher.close()
