"""Denoisers, guidance and samplers: small pure functions composed under ``jit``.

``denoiser`` wraps the model once (the parametrisation is :mod:`sd_jax.parametrization`), ``guidance`` wraps it for
CFG, ``grids`` builds each scheduler's noise levels, ``samplers_onestep`` / ``samplers_multistep`` hold the step
math over the one ``lax.scan`` of ``loop``, and ``registry`` is the entry: ``sampler_grid``, ``start_from`` and
``sample``, which pipelines and tests call.
"""
