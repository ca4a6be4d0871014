"""One worker script per contender, each run in its own process (see ``protocol.py``).

Workers import only their own framework, never ``bench`` modules beyond ``protocol``:
``diffusers_flax`` runs in a separate virtual environment with diffusers 0.39.
"""
