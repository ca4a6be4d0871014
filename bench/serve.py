"""(g) Server batching throughput: ``python -m sd_jax.serve`` under concurrent clients against one at a time.

The server runs the embedded model in its own process (``python -m sd_jax.serve --port P ...``, its compiles done
by ``--warmup`` before the port opens); the clients are threads of this process, one ``requests.Session`` each.
Every row sends the same ``total`` txt2img requests (one spec: size, steps, sampler; distinct prompts and seeds):
``C`` clients send ``total / C`` each, back to back, to a server with ``--max-batch 16 --batch-window-ms 30``; the
baseline is one client sending them one at a time to a server with ``--max-batch 1`` (no batching).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bench.harness import REPO, Settings, worker_env
from bench.report import Table, number

SAMPLER = "Euler a"
SIZE = 64
STEPS = 8
MAX_BATCH, WINDOW_MS, QUEUE = 16, 100.0, 256
CONCURRENCY, TOTAL = (1, 4, 16, 64), 128
QUICK_CONCURRENCY, QUICK_TOTAL = (1, 4), 16
TARGET = 3.0  # images/s at 16 clients over the sequential images/s


@dataclasses.dataclass
class Result:
    label: str
    clients: int
    requests: int
    ok: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]  # HTTP status -> count (0: no answer)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]

    @property
    def p50(self) -> float | None:
        return self.quantile(0.5)

    @property
    def p95(self) -> float | None:
        return self.quantile(0.95)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m sd_jax.serve`` in a subprocess on a free 127.0.0.1 port; ready once GET /health answers 200."""

    def __init__(self, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "sd_jax.serve", "--port", str(self.port), *flags],
                                     cwd=REPO, env=worker_env(), stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip

    def wait(self, timeout: float = 900.0) -> Server:
        import requests

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read()[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def server_flags(max_batch: int, steps: int, size: int = SIZE, window_ms: float = WINDOW_MS,
                 queue: int = QUEUE) -> list[str]:  # fmt: skip
    return ["--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--queue-size", str(queue),
            "--warmup", f"{size}x{size}:{steps}:{SAMPLER}"]  # fmt: skip


def load(url: str, clients: int, total: int, steps: int, size: int = SIZE, label: str = "",
         seed0: int = 1000, timeout: float = 600.0) -> Result:  # fmt: skip
    """``clients`` threads send ``total / clients`` txt2img requests each, back to back; all start together."""
    import requests

    if total % clients:
        raise ValueError(f"{total} requests do not split evenly over {clients} clients")
    each = total // clients
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with requests.Session() as s:
            start.wait()
            for k in range(each):
                i = c * each + k
                body = {"prompt": f"a photo of a cat, number {i}", "negative_prompt": "", "seed": seed0 + i,
                        "steps": steps, "width": size, "height": size, "sampler_name": SAMPLER, "batch_size": 1,
                        "n_iter": 1, "cfg_scale": 7.0}  # fmt: skip
                t0 = time.perf_counter()
                try:
                    r = s.post(url + "/sdapi/v1/txt2img", json=body, timeout=timeout)
                    code = r.status_code
                    if code == 200 and len(r.json().get("images", [])) != 1:
                        code = -1  # a 200 without its one image counts as a failure
                except requests.RequestException:
                    code = 0
                dt = time.perf_counter() - t0
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == 200:
                        latencies.append(dt)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    name = label or (f"{clients} clients" if clients > 1 else "1 client")
    return Result(name, clients, total, ok, seconds, latencies, statuses)


def measure(concurrency=CONCURRENCY, total: int = TOTAL, steps: int = STEPS, max_batch: int = MAX_BATCH,
            size: int = SIZE, window_ms: float = WINDOW_MS, log=print) -> tuple[Result, list[Result]]:  # fmt: skip
    """The sequential baseline (``--max-batch 1``, one client) and one result per concurrency (batching server)."""
    queue = max(QUEUE, total)
    # Both start (import, load, compile) side by side, then are measured one after the other, the other idle.
    log(f"  starting the sequential (--max-batch 1) and batching (--max-batch {max_batch}) servers")
    with Server(*server_flags(1, steps, size, window_ms, queue)) as one, \
            Server(*server_flags(max_batch, steps, size, window_ms, queue)) as many:  # fmt: skip
        one.wait(), many.wait()
        log(f"  sequential: {total} requests, {size}x{size}, {steps} steps, {SAMPLER}")
        load(one.url, 1, min(4, total), steps, size, seed0=0)  # first requests off the clock (HTTP, PNG paths)
        seq = load(one.url, 1, total, steps, size, label="sequential (--max-batch 1, 1 client)")
        log(f"    {seq.images_per_s:.3g} images/s")
        one.close()
        rows = []
        log(f"  batching: --max-batch {max_batch}, --batch-window-ms {window_ms:g}")
        load(many.url, min(4, total), min(4, total), steps, size, seed0=0)
        for c in concurrency:
            r = load(many.url, c, total, steps, size)
            log(f"    {c} clients: {r.images_per_s:.3g} images/s, p50 {number(r.p50)} s, p95 {number(r.p95)} s")
            rows.append(r)
    return seq, rows


def table(seq: Result, rows: list[Result], steps: int, size: int, max_batch: int, window_ms: float,
          load_before: str, load_after: str) -> Table:  # fmt: skip
    t = Table("(g) Server batching throughput",
              ["clients", "requests", "images/s", "p50 latency [s]", "p95 latency [s]", "speed-up vs sequential",
               "failed"])  # fmt: skip

    def row(r: Result, speedup: str) -> list[str]:
        failed = {k: v for k, v in r.statuses.items() if k != 200}
        bad = ", ".join(f"{v}× {k or 'no answer'}" for k, v in sorted(failed.items())) or "0"
        return [r.label, str(r.requests), number(r.images_per_s), number(r.p50), number(r.p95), speedup, bad]

    t.rows.append(row(seq, "1×"))
    base = seq.images_per_s
    for r in rows:
        t.rows.append(row(r, f"{r.images_per_s / base:.2f}×" if base else "n/a"))
    at16 = next((r for r in rows if r.clients == 16), None)
    t.notes = [
        f"Embedded model (no `--model`), fp32, txt2img {size}x{size}, {steps} steps, `{SAMPLER}`, CFG 7, batch_size 1 "
        "per request, distinct prompts and seeds. The server is `python -m sd_jax.serve` in its own process, "
        f"compiled before timing (`--warmup {size}x{size}:{steps}:{SAMPLER}`, every batch bucket); clients are "
        "threads of the bench process, one `requests.Session` each, sending their share back to back.",
        f"Batching server: `--max-batch {max_batch} --batch-window-ms {window_ms:g} --queue-size "
        f"{max(QUEUE, seq.requests)}`; sequential: the same requests, one client, `--max-batch 1`. images/s = "
        "requests answered 200 / wall time from the first send to the last answer; latency = one request's send to "
        "answer. Speed-up = images/s over the sequential images/s.",
        f"Load average before: {load_before}; after: {load_after} (2 cores: other processes slow every row).",
    ]
    if at16 and base:
        s = at16.images_per_s / base
        t.notes.append(f"Target (>= {TARGET:g}× the sequential throughput at 16 clients): "
                       f"{'met' if s >= TARGET else 'not met'} ({s:.2f}×).")  # fmt: skip
    return t


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(st: Settings, ctx: dict) -> list[Table]:
    conc, total = (QUICK_CONCURRENCY, QUICK_TOTAL) if st.quick else (CONCURRENCY, TOTAL)
    before = loadavg()
    seq, rows = measure(conc, total, STEPS, MAX_BATCH, SIZE, WINDOW_MS, log=st.log)
    return [table(seq, rows, STEPS, SIZE, MAX_BATCH, WINDOW_MS, before, loadavg())]
