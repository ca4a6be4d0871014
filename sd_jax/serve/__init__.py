"""An AUTOMATIC1111-compatible HTTP API over the one pipeline: ``python -m sd_jax.serve`` (see the README).

* :mod:`sd_jax.serve.schemas`: the request and response models, with A1111's field names and defaults;
* :mod:`sd_jax.serve.jobs`: a checked request becomes a :class:`~sd_jax.serve.jobs.Job` of per-image rows, and
  compatible jobs run as one batch through ``StableDiffusion.generate``;
* :mod:`sd_jax.serve.batcher`: the queue, the batching window and the worker thread that owns the device;
* :mod:`sd_jax.serve.catalog`: the models a client may switch to (under ``--models-dir`` only), LoRAs, embeddings;
* :mod:`sd_jax.serve.app`: the FastAPI routes; :mod:`sd_jax.serve.cli`: flags, start-up, warm-up, uvicorn.
"""
