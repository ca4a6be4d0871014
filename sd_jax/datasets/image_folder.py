"""Deprecated: moved to :mod:`sd_jax.data.folder`. Each name still imports here, with a DeprecationWarning naming
its new home."""

from sd_jax.deprecation import moved

_MOVED = ["IMAGE_SUFFIXES", "CaptionedImageFolder", "ImageFolderError", "check_readable", "encoded_image",
          "folder_config_name", "prepare_folder", "prepared_skipped", "scan_folder"]  # fmt: skip
__all__ = list(_MOVED)
__getattr__ = moved(__name__, {n: f"sd_jax.data.folder.{n}" for n in _MOVED})
