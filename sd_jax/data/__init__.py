"""Training data: every source the ``data`` config can name, behind one :func:`make_source`.

- :mod:`~sd_jax.data.source`: the :class:`Source` protocol the trainer relies on;
- :mod:`~sd_jax.data.schema`: the one batch schema (pixels or cached latents) the loss reads;
- :mod:`~sd_jax.data.transforms`: image resize / crop / flip, shared by the pixel sources;
- :mod:`~sd_jax.data.synthetic`: colour fields for smoke tests (``data.source='synthetic'``);
- :mod:`~sd_jax.data.folder`: the TFDS builder for a folder of captioned images (``'folder'``);
- :mod:`~sd_jax.data.tfds`: batches from any prepared TFDS dataset, read with grain (``'folder'``, ``'tfds'``);
- :mod:`~sd_jax.data.shapes` and :mod:`~sd_jax.data.shapes_source`: the embedded model's set (``'shapes'``);
- :mod:`~sd_jax.data.dreambooth`: instance and class images (``'dreambooth'``);
- :mod:`~sd_jax.data.cache`: the latent cache (``data.cache``) and its builder, which takes encode functions.

Batches are a pure function of (seed, step, process): resuming at step k gives exactly the batches an
uninterrupted run would have seen, and each host reads only its own shard of the records. This package imports
no trainer, pipeline or CLI: whatever needs models (the cache's encoders, DreamBooth's class images) is passed in.
"""

from __future__ import annotations

from sd_jax.data.source import Source
from sd_jax.data.synthetic import SyntheticSource

SOURCES = ("synthetic", "shapes", "folder", "tfds", "dreambooth")


def make_source(cfg, tokenizer, *, workdir=None, process_index=None, process_count=None) -> Source:
    """The ``data`` config's source: ``synthetic``, ``shapes``, ``folder`` (prepared once with the TFDS folder builder
    into ``data.data_dir`` or ``WORKDIR/tfds``), ``tfds`` (a prepared dataset ``data.tfds_name`` in ``data.data_dir``)
    or ``dreambooth`` (its class images already sampled). With ``data.cache`` set, a folder or TFDS source gives
    cached VAE latents and text embeddings instead of pixels and ids."""
    if cfg.source == "synthetic":
        return SyntheticSource(cfg, tokenizer)
    if cfg.source == "shapes":  # the embedded model's generated data set
        from sd_jax.data.shapes_source import ShapesSource

        return ShapesSource(cfg, tokenizer)
    if cfg.source == "dreambooth":
        from sd_jax.data.dreambooth import DreamBoothSource

        return DreamBoothSource(cfg, tokenizer, process_index=process_index, process_count=process_count)
    if cfg.source not in ("folder", "tfds"):
        raise ValueError(f"data.source must be one of {', '.join(map(repr, SOURCES))}, got {cfg.source!r}")
    from sd_jax.data.tfds import TfdsSource, tfds_builder

    builder = tfds_builder(cfg, workdir)
    source = TfdsSource(builder, cfg, tokenizer, process_index=process_index, process_count=process_count)
    if cfg.get("cache"):
        from sd_jax.data.cache import CachedSource

        return CachedSource(source, cfg.cache)
    return source


__all__ = ["SOURCES", "Source", "SyntheticSource", "make_source"]
