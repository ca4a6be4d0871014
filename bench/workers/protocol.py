"""The line protocol between the bench and a worker process (standard library only).

The bench writes one JSON object per line on the worker's stdin: first the spec, then
commands (``{"cmd": "run"}``, ``{"cmd": "quit"}``). The worker answers each with one JSON
line on its private copy of stdout; anything libraries print goes to stderr instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable


def serve(setup: Callable[[dict], tuple[dict, dict[str, Callable[[dict], dict]]]]) -> None:
    """``setup(spec) -> (info, handlers)``; then answer commands until ``quit`` or end of input."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    sys.stdout = sys.stderr

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    spec = json.loads(sys.stdin.readline())
    try:
        t0 = time.perf_counter()
        info, handlers = setup(spec)
        reply({"ready": True, "setup_s": time.perf_counter() - t0, **info})
    except Exception as e:  # reported to the bench, which marks this contender n/a
        reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("cmd") == "quit":
            break
        try:
            reply(handlers[msg["cmd"]](msg))
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
