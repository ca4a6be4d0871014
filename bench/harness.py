"""Contenders in their own processes, driven in turn (A B C A B C ...), medians of their answers."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]

OURS, TORCH, FLAX, TORCH_COMPILE = "ours", "torch", "flax", "torch_compile"
TITLES = {OURS: "sd-jax (ours)", TORCH: "diffusers PyTorch", FLAX: "diffusers 0.39 Flax",
          TORCH_COMPILE: "diffusers PyTorch + torch.compile"}  # fmt: skip
MODULES = {OURS: "bench.workers.ours", TORCH: "bench.workers.diffusers_torch", FLAX: "bench.workers.diffusers_flax",
           TORCH_COMPILE: "bench.workers.diffusers_torch"}  # fmt: skip


class WorkerError(RuntimeError):
    pass


@dataclasses.dataclass
class Settings:
    quick: bool
    repeats: int
    contenders: tuple[str, ...]
    log: Callable[[str], None] = print
    python: dict[str, str] = dataclasses.field(default_factory=dict)  # contender -> interpreter (cached)
    gpu: bool = False
    dry_run: bool = False  # GPU mode's code with tiny models (tests)
    torch_threads: int | None = None
    versions: dict[str, dict] = dataclasses.field(default_factory=dict)  # contender -> versions it reported

    def interpreter(self, contender: str) -> str:
        if contender not in self.python:
            if contender == FLAX:
                from bench import flax_venv

                self.python[contender] = flax_venv.python(self.log)
            else:
                self.python[contender] = sys.executable
        return self.python[contender]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # One real device per worker, whatever the caller simulates (tests use 8 CPU devices).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


class Worker:
    """One contender's process: sent a spec at start, then commands; each answer is a dict."""

    def __init__(self, settings: Settings, contender: str, spec: dict):
        self.contender = contender
        self.proc = subprocess.Popen(
            [settings.interpreter(contender), "-m", MODULES[contender]],
            cwd=REPO,
            env=worker_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("SD_JAX_BENCH_VERBOSE") else subprocess.DEVNULL,
            text=True,
        )
        self.ready = self._send(spec)

    def _send(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise WorkerError(f"{self.contender}: worker exited (code {self.proc.poll()})") from e
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(
                f"{self.contender}: worker exited (code {self.proc.wait()}); rerun with SD_JAX_BENCH_VERBOSE=1"
            )
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise WorkerError(f"{self.contender}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer

    def call(self, cmd: str = "run", **kw) -> dict:
        return self._send({"cmd": cmd, **kw})

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclasses.dataclass
class Outcome:
    """Samples (or the reason there are none) of one contender for one measurement."""

    samples: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def start(settings: Settings, contender: str, spec: dict) -> tuple[Worker | None, str | None]:
    settings.log(f"  {contender}: {spec.get('task')} {spec.get('label', '')}")
    if settings.torch_threads:
        spec = {**spec, "threads": settings.torch_threads}
    try:
        w = Worker(settings, contender, spec)
        if "versions" in w.ready:
            settings.versions[contender] = w.ready["versions"]
        return w, None
    except (WorkerError, subprocess.CalledProcessError, OSError) as e:
        settings.log(f"  {contender} failed: {str(e).splitlines()[0]}")
        return None, str(e).splitlines()[0]


def interleaved(settings: Settings, specs: dict, key: str = "seconds", cmd: str = "run") -> dict[str, Outcome]:
    """Start every contender (one process each), then ask them in turn, ``repeats`` rounds.

    Only one process computes at a time; the others wait on their stdin. A spec may be a
    function of the earlier contenders' ready answers (``{contender: answer}``).
    """
    workers, out, ready = {}, {}, {}
    try:
        for c, spec in specs.items():
            if callable(spec):
                try:
                    spec = spec(ready)
                except (KeyError, ValueError) as e:
                    out[c] = Outcome(error=f"not run: {e}")
                    continue
            w, err = start(settings, c, spec)
            out[c] = Outcome(error=err)
            if w is not None:
                workers[c] = w
                out[c].extra = ready[c] = {k: v for k, v in w.ready.items() if k != "ready"}
        for r in range(settings.repeats):
            for c, w in list(workers.items()):
                try:
                    out[c].samples.append(float(w.call(cmd)[key]))
                except WorkerError as e:
                    out[c].error = str(e).splitlines()[0]
                    del workers[c]
            settings.log(f"  round {r + 1}/{settings.repeats}: " + ", ".join(
                f"{c} {out[c].samples[-1]:.4g}" for c in workers if out[c].samples))  # fmt: skip
    finally:
        for w in workers.values():
            w.close()
    return out


def one_shot(settings: Settings, contender: str, spec: dict) -> dict:
    """A fresh process that answers its spec once (cold starts, peak memory)."""
    w, err = start(settings, contender, spec)
    if w is None:
        raise WorkerError(err)
    try:
        return w.ready
    finally:
        w.close()
