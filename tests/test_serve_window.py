"""The batcher's window (sd_jax.serve.batcher), with the pipeline replaced by a recorder: a lone client never
waits for companions that will not come; clients coming back from a batch are gathered into one batch again."""

import dataclasses
import time
import types

import pytest

from sd_jax.serve import batcher as batcher_lib
from sd_jax.serve import batches
from sd_jax.serve.jobs import Job


@dataclasses.dataclass(frozen=True)
class Spec:
    alone: object = None
    steps: int = 2
    loras: tuple = ()


@pytest.fixture
def recorder(monkeypatch):
    ran = []

    def run_batch(pipe, jobs, max_batch):
        ran.append((time.monotonic(), [j.task_id for j in jobs]))
        time.sleep(0.05)
        return [[] for _ in jobs]

    monkeypatch.setattr(batches, "run_batch", run_batch)
    monkeypatch.setattr(batches, "response", lambda job, images, model, interrupted=False: {"id": job.task_id})
    state = types.SimpleNamespace(pipe=types.SimpleNamespace(on_step=None), model="m")
    b = batcher_lib.Batcher(state, max_batch=8, batch_window_ms=1500, queue_size=64)
    yield b, ran
    b.close()


def job(name: str) -> Job:
    return Job("txt2img", Spec(), [object()], {}, {}, name)


def test_a_lone_client_does_not_wait_for_the_window(recorder):
    b, ran = recorder
    b.submit(job("warm")).result(10)  # before any batch the window applies (no history yet)
    t0 = time.monotonic()
    for k in range(3):  # one client, back to back: each runs at once, not after 1.5 s
        b.submit(job(f"r{k}")).result(10)
    assert time.monotonic() - t0 < 1.0, "a lone client waited for the batch window"
    assert [ids for _, ids in ran[1:]] == [["r0"], ["r1"], ["r2"]]


def test_clients_coming_back_are_gathered_again(recorder):
    b, ran = recorder
    first = [b.submit(job(f"a{k}")) for k in range(3)]
    for f in first:
        f.result(10)
    assert [ids for _, ids in ran] == [["a0", "a1", "a2"]]
    # the three come back one by one, 0.2 s apart: they wait for each other (3 were active), not the whole window
    t0 = time.monotonic()
    futs = []
    for k in range(3):
        futs.append(b.submit(job(f"b{k}")))
        time.sleep(0.2)
    for f in futs:
        f.result(10)
    assert [ids for _, ids in ran[1:]] == [["b0", "b1", "b2"]]
    assert time.monotonic() - t0 < 1.4  # ran as soon as the third came, before the 1.5 s window closed
