"""TFDS builders: the generated "shapes" set and image folders with captions."""
