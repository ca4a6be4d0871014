"""A TFDS builder for a folder of captioned images, prepared as array_record and read without TensorFlow.

Folder layouts accepted (as users already have them):

- ``metadata.jsonl`` with one JSON object per line holding ``file_name`` (relative to the folder) and ``text``;
- otherwise every image under the folder, its caption in ``name.txt`` beside ``name.png`` (empty if absent).

Each folder gets its own builder config, named after the folder and a fingerprint of its listing (names, sizes,
modification times), so several folders can share one ``data_dir`` and a changed folder is prepared afresh. An
unreadable or corrupt image is skipped and listed in the prepared dataset's ``metadata.json`` (``skipped``).
Images are stored as their original JPEG/PNG bytes when those are RGB, otherwise re-encoded as RGB PNG.

    builder = prepare_folder("/data/my_images", "/data/tfds")
    source = builder.as_data_source()["train"]      # {"image", "text", "file_name"}
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re

import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from sd_jax.errors import SDJaxError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolderError(SDJaxError, ValueError):
    """An image folder that holds nothing to train on (no images, or none readable)."""


def scan_folder(root: os.PathLike | str) -> list[tuple[pathlib.Path, str]]:
    """(image path, caption) pairs of a folder, from ``metadata.jsonl`` or ``.txt`` files beside the images."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: image folder not found (data.path)")
    meta = root / "metadata.jsonl"
    if meta.exists():
        items = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                items.append((root / rec["file_name"], str(rec.get("text", ""))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ImageFolderError(f"{meta}:{n}: needs a JSON object with 'file_name' and 'text' ({e!r})") from None
        return items
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "") for p in files]


def folder_config_name(root: os.PathLike | str) -> str:
    """``<folder name>_<10 hex digits>``: the fingerprint covers the path, every listed file and every caption."""
    root = pathlib.Path(root).absolute()
    h = hashlib.sha1(str(root).encode())
    for path, text in scan_folder(root):
        st = path.stat() if path.exists() else None
        h.update(f"{path.relative_to(root)}\0{text}\0{st and st.st_size}\0{st and st.st_mtime_ns}\n".encode())
    slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_") or "folder"
    return f"{slug}_{h.hexdigest()[:10]}"


def encoded_image(path: pathlib.Path) -> bytes:
    """The file's bytes if it is an RGB JPEG/PNG that decodes fully, else an RGB PNG; raises on a corrupt file."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes every pixel: truncated or corrupt files fail here
        if im.format in ("JPEG", "PNG") and im.mode == "RGB":
            return data
        out = io.BytesIO()
        im.convert("RGB").save(out, format="PNG")
        return out.getvalue()


def check_readable(folder: os.PathLike | str) -> int:
    """Decode images until the first readable one; returns how many were unreadable before it. Raises
    :class:`ImageFolderError` for a folder with no images or none that decodes."""
    items = scan_folder(folder)
    if not items:
        raise ImageFolderError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no metadata.jsonl; put captioned images there"
        )
    for bad, (path, _) in enumerate(items):
        try:
            encoded_image(path)
            return bad
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    raise ImageFolderError(f"{folder}: none of its {len(items)} image file(s) can be read (all corrupt or missing)")


class CaptionedImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images with captions from a local folder (see the module docstring for the layouts)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, folder: os.PathLike | str | None = None, config=None, **kwargs):
        self._folder = pathlib.Path(folder) if folder is not None else None
        if config is None and folder is not None:
            name = folder_config_name(folder)
            config = tfds.core.BuilderConfig(name=name, description=f"images and captions of {self._folder}")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned images from a local folder (metadata.jsonl or .txt captions).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "text": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        if self._folder is None:
            raise ValueError("CaptionedImageFolder needs folder=... to prepare (reading a prepared one does not)")
        return {"train": self._generate_examples(self._folder)}

    def _generate_examples(self, folder: pathlib.Path):
        skipped = []
        for path, text in scan_folder(folder):
            name = str(path.relative_to(folder))
            try:
                data = encoded_image(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                skipped.append(name)
                logging.warning("skipping unreadable image %s: %s", path, e)
                continue
            yield name, {"image": data, "text": text, "file_name": name}
        self.info.metadata["skipped"] = skipped
        if skipped:
            logging.warning("%s: skipped %d unreadable image(s)", folder, len(skipped))


def prepare_folder(folder: os.PathLike | str, data_dir: os.PathLike | str) -> CaptionedImageFolder:
    """Prepare ``folder`` into ``data_dir`` as array_record (once: a prepared, unchanged folder is reused)."""
    builder = CaptionedImageFolder(folder=folder, data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
        check_readable(folder)  # before TFDS writes anything (it refuses an empty split only at the end)
    builder.download_and_prepare()
    return builder


def prepared_skipped(builder) -> int:
    """How many images were skipped (unreadable) when the folder was prepared (0 for other datasets)."""
    return len(builder.info.metadata.get("skipped", []) or []) if builder.info.metadata is not None else 0
