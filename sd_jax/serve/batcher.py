"""The queue and the one worker thread that owns the pipeline.

``submit`` queues a checked job (a full queue raises :class:`QueueFull`: the app answers 503 with Retry-After).
The worker takes the oldest job, waits up to ``batch_window_ms`` for more jobs of the same
:class:`~sd_jax.serve.jobs.Spec` (only until it has as many rows as were active when a recent batch ended, since
those clients are likely coming back: a lone client never waits), and runs up to ``max_batch`` rows of them as one
batch
(:func:`sd_jax.serve.batches.run_batch`). Jobs of other specs wait their turn, oldest first. A job whose client
went away is dropped from the queue. A running batch is one jitted loop that asks :meth:`Batcher.should_stop`
before each step (the pipeline's ``should_stop``): after ``interrupt``, or once every client of the batch has
gone away, its remaining steps are skipped, and its requests are answered as interrupted, with no images.
(Raising from a host callback instead would abort the process in this jaxlib.) A failing batch fails its own
jobs only.

Progress comes from the pipeline's host callback (``on_step``), which the loop already calls once per step.
Model switches (``call``) run on the worker between batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time

from sd_jax.pipelines.lora_sets import LoraSets
from sd_jax.serve import batches

log = logging.getLogger("sd_jax.serve")


class QueueFull(RuntimeError):
    pass


class Batcher:
    def __init__(self, state, *, max_batch: int = 8, batch_window_ms: float = 20.0, queue_size: int = 64):
        self.state = state  # sd_jax.serve.app.ServerState: .pipe, .model
        self.max_batch, self.window, self.queue_size = max_batch, batch_window_ms / 1000.0, queue_size
        # rows active when each of the last batches ended: how many clients are likely to come back
        self.active: collections.deque = collections.deque(maxlen=8)
        self.free_since = 0.0  # when the worker last finished a batch
        self.pending: list = []
        self.running: list = []
        self.calls: list = []  # (fn, future): work for the worker between batches (model switches)
        self.cv = threading.Condition()
        self.interrupt_flag = False
        self.step, self.total, self.batch_started = 0, 0, None
        self.done_count = 0
        self.lora_sets: LoraSets | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._work, name="sd-jax-batcher", daemon=True)
        self.thread.start()

    # -- the app's side --

    def submit(self, job) -> concurrent.futures.Future:
        with self.cv:
            if len(self.pending) + len(self.running) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests) ; retry shortly")
            self.pending.append(job)
            self.cv.notify_all()
        return job.future

    def call(self, fn) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker between batches (it owns the pipeline)."""
        fut = concurrent.futures.Future()
        with self.cv:
            self.calls.append((fn, fut))
            self.cv.notify_all()
        return fut

    def cancel(self, job) -> None:
        """The client went away: drop the job if queued; if running, stop the batch once all its jobs are gone."""
        with self.cv:
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)
                job.future.cancel()
            self.cv.notify_all()

    def interrupt(self) -> None:
        with self.cv:
            self.interrupt_flag = bool(self.running)

    def should_stop(self) -> bool:
        """Asked by the running loop before each step: interrupted, or every client of the batch gone."""
        return self.interrupt_flag or bool(self.running) and all(j.cancelled for j in self.running)

    def find(self, task_id: str):
        with self.cv:
            for where, jobs in (("running", self.running), ("queued", self.pending)):
                for j in jobs:
                    if j.task_id == task_id:
                        return where, j
        return None, None

    def queued(self) -> int:
        with self.cv:
            return len(self.pending)

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        self.thread.join(timeout=10)

    # -- the worker --

    def _take(self) -> list:
        """The next batch: the oldest job and, within the window, more jobs of its spec (rows <= max_batch)."""
        with self.cv:
            while not self.pending and not self.calls and not self._stop:
                self.cv.wait()
            if self._stop or self.calls:
                return []
            first = self.pending[0]
            if first.spec.alone is None and first.size < self.max_batch:
                # the window opens when the job came or, if it queued behind a running batch, when that ended
                deadline = max(first.queued_at, self.free_since) + self.window
                while sum(j.size for j in self._same(first)) < self._expected():
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    self.cv.wait(timeout=deadline - now)
                    if first not in self.pending:  # cancelled meanwhile
                        return []
            picked, rows = [], 0
            for j in self._same(first):
                if picked and rows + j.size > self.max_batch:
                    break
                picked.append(j)
                rows += j.size
            for j in picked:
                self.pending.remove(j)
            self.running = picked
            self.interrupt_flag = False
            return picked

    def _expected(self) -> int:
        """Rows worth waiting for: the most that were active when one of the last 8 batches ended (its own
        clients, likely coming back, and those queued meanwhile), at most ``max_batch``; before any batch,
        ``max_batch`` (the window bounds the wait)."""
        if not self.active:
            return self.max_batch
        return min(self.max_batch, max(*self.active, 1))

    def _same(self, first) -> list:
        if first.spec.alone is not None:
            return [first]
        return [j for j in self.pending if j.spec == first.spec]

    def _on_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        for j in self.running:
            j.step, j.total = step, total

    def _work(self) -> None:
        while True:
            jobs = self._take()
            with self.cv:
                if self._stop:
                    return
                calls, self.calls = self.calls, []
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            if jobs:
                self._run(jobs)

    def _use_loras(self, pipe, loras: tuple) -> None:
        """The prompt's ``<lora:...>`` tags on the weights for this batch only (the weights as loaded otherwise)."""
        if self.lora_sets is not None and self.lora_sets.pipe is not pipe:  # a model switch: new weights
            self.lora_sets = None
        if loras and self.lora_sets is None:
            self.lora_sets = LoraSets(pipe)
        if self.lora_sets is not None:
            self.lora_sets.use(loras)

    def _run(self, jobs: list) -> None:
        pipe = self.state.pipe
        now = time.monotonic()
        for j in jobs:
            j.started_at = now
        self.step, self.total, self.batch_started = 0, jobs[0].spec.steps, now
        pipe.on_step = self._on_step
        try:
            self._use_loras(pipe, jobs[0].spec.loras)
            results = batches.run_batch(pipe, jobs, self.max_batch)
            stopped = self.should_stop()
            outs = [batches.response(j, [] if stopped else imgs, self.state.model, interrupted=stopped)
                    for j, imgs in zip(jobs, results)]  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a failing batch fails its own jobs, and the server goes on
            log.warning("batch of %d job(s) failed: %s", len(jobs), e)
            for j in jobs:
                j.future.set_exception(e)
        else:
            for j, out in zip(jobs, outs):
                j.future.set_result(out)
        finally:
            pipe.on_step = None
            with self.cv:
                self.done_count += len(jobs)
                # the clients active now: this batch's (likely coming back) and those that queued meanwhile
                self.active.append(sum(j.size for j in jobs) + sum(j.size for j in self.pending))
                self.free_since = time.monotonic()
                self.running = []
                self.batch_started = None
                self.interrupt_flag = False
