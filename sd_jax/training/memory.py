"""Memory of one training step, from XLA's own numbers, checked before the first step runs.

``compiled.memory_analysis()`` gives the bytes of the step's arguments, outputs (less those aliased by donation)
and temporaries per device. The limit is the device's (``memory_stats()['bytes_limit']``), or on the CPU the
machine's available memory; ``config.max_memory_gb`` replaces it (``0`` turns the check off).
"""

from __future__ import annotations

import os

import jax

from sd_jax.errors import SDJaxError

GB = 1024**3


class MemoryEstimateError(SDJaxError, RuntimeError):
    """A training step would need more memory than the device has."""


def step_bytes(compiled) -> int | None:
    """Peak bytes one device needs for ``compiled`` (None when the backend does not say)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def device_limit_bytes() -> int | None:
    """What one device can hold: its allocator's limit, or (CPU) the memory available on this machine."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        # CPU "devices" share the machine's memory
        return int(info["MemAvailable"].split()[0]) * 1024 // max(1, jax.local_device_count())
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return pages * os.sysconf("SC_PAGE_SIZE") // max(1, jax.local_device_count()) or None


def check_step_memory(compiled, cfg) -> int | None:
    """Refuse a step that cannot fit, naming the estimate and the settings that shrink it; returns the estimate."""
    need = step_bytes(compiled)
    override = cfg.get("max_memory_gb")
    if need is None or override == 0:
        return need
    limit = int(override * GB) if override else device_limit_bytes()
    if limit and need > limit:
        d = cfg.data
        raise MemoryEstimateError(
            f"one training step needs about {need / GB:.1f} GB per device, more than the {limit / GB:.1f} GB "
            f"{'allowed by max_memory_gb' if override else 'available'} (batch_size={cfg.batch_size}, "
            f"data.image_size={d.get('image_size')}, compute_dtype={cfg.get('compute_dtype')}); lower "
            "--config.batch_size or --config.data.image_size, set --config.remat_policy=nothing_saveable, "
            "or raise the limit with --config.max_memory_gb=N (0: no check)"
        )
    return need
