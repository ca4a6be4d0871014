"""What every request check shares: :class:`FieldError` (a 422 naming the field), the server's
:class:`Limits`, and decoding a base64 upload (:func:`decode_image`) within them."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io


class FieldError(ValueError):
    """A request field is wrong; ``field`` names it, the message says what to do."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Limits:
    max_size: int = 2048  # pixels per side
    max_images: int = 64  # batch_size * n_iter per request
    max_image_pixels: int = 4096 * 4096  # a decoded upload


def decode_image(text: str, field: str, limits: Limits):
    """A base64 image (optionally a ``data:image/...;base64,`` URL) as a PIL image, or a FieldError."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str) or not text:
        raise FieldError(field, f"{field} is empty ; send a base64-encoded PNG/JPEG/WebP")
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise FieldError(field, f"{field} is not valid base64 ({e}) ; send a base64-encoded image") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if img.size[0] * img.size[1] > limits.max_image_pixels:
            raise FieldError(field, f"{field} is {img.size[0]}x{img.size[1]} pixels, more than the server takes "
                                    f"({limits.max_image_pixels}) ; send a smaller image")  # fmt: skip
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        if isinstance(e, FieldError):
            raise
        raise FieldError(field, f"{field} does not decode as an image ({type(e).__name__}) ; send a base64 "
                                "PNG, JPEG or WebP") from None  # fmt: skip
    return img
