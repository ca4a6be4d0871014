"""What the numbers were measured on: CPU, cores, memory, load, library versions."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = _memory_gib()
    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": flags,
        "cores": cores,
        "memory": f"{mem:.1f} GiB" if mem else "unknown",
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers")},
    }


def markdown(info: dict, flax_versions: dict | None, extra_lines=()) -> str:
    v = info["versions"]
    lines = [
        f"- Machine: {info['cpu']} ({info['cpu_flags']}), {info['cores']} cores, {info['memory']} RAM; {info['os']}",
        f"- Load average at start: {info['load_average']}; at end: {info.get('load_average_end', '?')}"
        " (other processes on a shared machine slow every contender)",
        f"- sd-jax: Python {info['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, "
        f"optax {v['optax']}",
        f"- diffusers PyTorch: diffusers {v['diffusers']}, torch {v['torch']}, transformers {v['transformers']}",
    ]
    if flax_versions:
        fv = ", ".join(f"{k} {x}" for k, x in flax_versions.items())
        lines.append(f"- diffusers Flax (own venv): {fv}")
    lines += [f"- {x}" for x in extra_lines]
    return "\n".join(lines) + "\n"
