"""Train with sd-jax; see ``configs/`` and the README."""

from sd_jax.cli.train import main

if __name__ == "__main__":
    main()
