"""Two processes on 127.0.0.1 (4 CPU devices each) train the tiny config like one 8-device process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def launch(workdir, devices, extra=()):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1")  # fmt: skip
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
           "--config.steps=3", "--config.log_every=1", "--config.optim.lr=1e-4", *extra]  # fmt: skip
    return cmd, env


@pytest.mark.slow  # three train.py runs, two of them as jax.distributed processes: ~10 min of the 2-core CI
def test_two_processes_match_one(tmp_path):
    port = free_port()
    procs = []
    for i in range(2):
        cmd, env = launch(tmp_path / "multi", 4, ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                                                   "--process_id", str(i)])  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    cmd, env = launch(tmp_path / "single", 8)
    single = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = losses(tmp_path / "multi"), losses(tmp_path / "single")
    print("multi-host losses", multi, "single", one)
    assert len(multi) == 3 and np.allclose(multi, one, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints"))[-1] == "3"
