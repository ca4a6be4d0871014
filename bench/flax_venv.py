"""The separate virtual environment for diffusers 0.39 Flax (the last diffusers release with Flax pipelines).

Created on first use under ``~/.cache/sd_jax/bench_venv_flax`` (``SD_JAX_BENCH_FLAX_VENV`` overrides).
Where no CPU torch wheel is at hand locally, set ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu``
so pip does not pull the CUDA build.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

PINS = ("diffusers==0.39.0", "transformers==4.57.6", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "torch==2.13.0")


def venv_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "sd_jax" / "bench_venv_flax"
    return pathlib.Path(os.environ.get("SD_JAX_BENCH_FLAX_VENV", default))


SIZE = "about 1.9 GB"  # what the pins install (torch's CPU build is most of it)


def ready() -> bool:
    """Whether the venv exists with the current pins (nothing to install)."""
    root = venv_dir()
    marker = root / ".pins"
    return (root / "bin" / "python").exists() and marker.exists() and marker.read_text() == "\n".join(PINS)


def python(log=print) -> str:
    """The venv's interpreter, creating the venv and installing the pins if needed (callers ask first: ready())."""
    root = venv_dir()
    exe = root / "bin" / "python"
    if ready():
        return str(exe)
    log(f"installing diffusers 0.39 Flax into {root} (once): {' '.join(PINS)}")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(root)], check=True)
    subprocess.run([str(exe), "-m", "pip", "install", "-q", *PINS], check=True)
    (root / ".pins").write_text("\n".join(PINS))
    return str(exe)


if __name__ == "__main__":
    print(python())
