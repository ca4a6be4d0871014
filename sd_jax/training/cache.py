"""``python -m sd_jax.training.cache``: the documented command of :mod:`sd_jax.cli.cache` (the latent cache itself
is :mod:`sd_jax.data.cache`). Nothing imports this module."""

from sd_jax.cli.cache import main

if __name__ == "__main__":
    main()
