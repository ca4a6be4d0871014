"""Sample images with sd-jax; see ``python sample.py --help`` and the README."""

from sd_jax.cli.sample import main

if __name__ == "__main__":
    main()
