"""Denoisers, guidance and samplers: small pure functions composed under ``jit``."""
