"""``python -m sd_jax.pnginfo IMG``: print the generation parameters (A1111 infotext) an image carries.

Where they are, as A1111 writes and reads them: a PNG's ``parameters`` text chunk; a JPEG's or WebP's EXIF
UserComment (tag 0x9286 in the Exif IFD, an 8-byte ``UNICODE\\0`` prefix and UTF-16 text, as piexif writes
it); a GIF's comment extension. :func:`write_exif` builds the EXIF block (checked against piexif 1.1.3: it reads
the text back exactly).

Exit status 0 with the text on stdout; 1 with one line on stderr for an image without parameters; 2 for a
file that is missing or not an image.
"""

from __future__ import annotations

import argparse
import struct
import sys

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_PREFIXES = {b"UNICODE\x00": None, b"ASCII\x00\x00\x00": "ascii", b"JIS\x00\x00\x00\x00\x00": "shift_jis"}


def user_comment(text: str) -> bytes:
    """An EXIF UserComment value as piexif's ``UserComment.dump(text, encoding="unicode")``."""
    return b"UNICODE\x00" + text.encode("utf-16-be")


def write_exif(text: str) -> bytes:
    """An EXIF block holding only the UserComment ``text``: big-endian TIFF, IFD0 pointing to an Exif IFD with tag
    0x9286 of type UNDEFINED, as ``piexif.dump`` lays it out (plus the Exif IFD's next-IFD link, which the TIFF spec
    asks for and piexif leaves out). Pillow's ``Image.Exif`` would store the bytes as type BYTE, which piexif, and
    so A1111, reads back as a tuple of numbers."""
    value = user_comment(text)
    exif_ifd = 8 + 2 + 12 + 4  # the TIFF header, then IFD0's one entry and its next-IFD link
    data = exif_ifd + 2 + 12 + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8)
    tiff += struct.pack(">HHHII", 1, EXIF_IFD, 4, 1, exif_ifd) + struct.pack(">I", 0)
    tiff += struct.pack(">HHHI", 1, USER_COMMENT, 7, len(value)) + struct.pack(">I", data) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + tiff + value


def _decode_comment(raw, endian: str | None) -> str | None:
    if isinstance(raw, str):
        return raw or None
    if not raw:
        return None
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    if prefix in _PREFIXES:
        enc = _PREFIXES[prefix] or ("utf-16-le" if endian == "<" else "utf-16-be")
        return body.decode(enc, errors="replace").rstrip("\x00") or None
    return bytes(raw).decode("utf-8", errors="ignore").rstrip("\x00") or None


def read_parameters(path) -> str | None:
    """The infotext of the image at ``path`` (PNG text, EXIF UserComment or GIF comment), or None.

    Raises OSError / PIL.UnidentifiedImageError for a missing or unreadable file."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get("parameters")
        if isinstance(text, str) and text.strip():
            return text
        comment = im.info.get("comment")
        if comment:
            text = comment.decode("utf-8", errors="replace") if isinstance(comment, bytes) else str(comment)
            if text.strip():
                return text
        exif = im.getexif()
        return _decode_comment(exif.get_ifd(EXIF_IFD).get(USER_COMMENT), exif.endian)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sd_jax.pnginfo", description=__doc__.splitlines()[0])
    p.add_argument("image", help="a PNG, JPEG, WebP or GIF written by sd-jax, A1111 or another front end")
    args = p.parse_args(argv)
    from PIL import UnidentifiedImageError

    try:
        text = read_parameters(args.image)
    except (OSError, UnidentifiedImageError) as e:
        print(f"error: {args.image}: not a readable image ({str(e).splitlines()[0]})", file=sys.stderr)
        raise SystemExit(2) from None
    if text is None:
        print(f"error: {args.image} has no generation parameters (no PNG 'parameters' text, EXIF UserComment or "
              "GIF comment)", file=sys.stderr)  # fmt: skip
        raise SystemExit(1)
    print(text)


if __name__ == "__main__":
    main()
