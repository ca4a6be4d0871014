"""Command-line front ends; ``sample.py`` and ``train.py`` at the top level only call ``main`` here."""
