"""Moved to :mod:`sd_jax.data.folder`; these names stay importable here until callers switch."""

from sd_jax.data.folder import (
    IMAGE_SUFFIXES,
    CaptionedImageFolder,
    ImageFolderError,
    check_readable,
    encoded_image,
    folder_config_name,
    prepare_folder,
    prepared_skipped,
    scan_folder,
)

__all__ = ["IMAGE_SUFFIXES", "CaptionedImageFolder", "ImageFolderError", "check_readable", "encoded_image",
           "folder_config_name", "prepare_folder", "prepared_skipped", "scan_folder"]  # fmt: skip
