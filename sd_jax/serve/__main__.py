"""``python -m sd_jax.serve``: the A1111-compatible server (:mod:`sd_jax.serve.cli`)."""

from sd_jax.serve.cli import main

if __name__ == "__main__":
    main()
