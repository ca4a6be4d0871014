"""The :class:`Source` protocol: what the trainer asks of any training data.

Batches are a pure function of (seed, step, process): resuming at step k gives exactly the batches an
uninterrupted run would have seen, and each host reads only its own shard (or its own slice of the global batch).
"""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    """Training data. Subclass it to inherit the defaults (no skips, no model check)."""

    skipped: int = 0  # unreadable examples skipped at read time by this process (and refilled)
    prepared_skipped: int = 0  # unreadable images left out when the data set was prepared

    def batch(self, step: int, batch_size: int, offset: int = 0) -> dict:
        """``batch_size`` examples of the batch at ``step`` as a :mod:`sd_jax.data.schema` dict; ``offset`` is
        this process's first slot of the global batch (sources with per-host shards ignore it)."""
        ...

    def check_models(self, models, cfg) -> None:
        """Refuse models (or a run config) this data cannot feed; called once before training. Most accept all."""
        return None
