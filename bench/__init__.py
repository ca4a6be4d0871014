"""``python -m bench``: speed, compile time, training throughput, memory and FLOP/s of sd-jax against diffusers.

Kept free of imports: worker processes of other virtual environments import ``bench.workers``.
"""
