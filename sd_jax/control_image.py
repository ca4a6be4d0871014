"""Control images for ControlNets: read, resize as diffusers does, and the preprocessors that need no weights.

* :func:`load_control_image` reads a file (any mode Pillow opens: RGB, grayscale, RGBA, palette...) or takes an
  array or a PIL image, and returns it as RGB;
* :func:`resize_control_image` is diffusers' control image processor (``VaeImageProcessor(do_convert_rgb=True,
  do_normalize=False)`` in ``StableDiffusionControlNetPipeline.prepare_image``): a PIL image (a file, or an 8-bit
  array, which diffusers cannot take) is resized by Pillow's Lanczos filter, a float array in [0, 1] as diffusers
  resizes arrays, by ``torch.nn.functional.interpolate``'s default nearest rule; the result is HxWx3 float32 in
  [0, 1];
* :func:`canny` is OpenCV's ``cv2.Canny(image, 100, 200)``, which the ControlNet authors and diffusers' examples
  run on 8-bit images: 3x3 Sobel with replicated borders, L1 gradient magnitude (the channel of largest magnitude
  on colour images), non-maximum suppression along the gradient quantised to 4 directions (OpenCV's ``tan 22.5``
  fixed-point test, strict on one side), hysteresis with 8-connectivity. No smoothing, as OpenCV;
* :func:`invert` turns a scribble drawn dark on white into the white-on-black map scribble ControlNets take.

Pose and depth estimators need downloaded weights: pass their maps as images.
Only numpy, Pillow and scipy: this module is a leaf, the training input pipeline uses it too.
"""

from __future__ import annotations

import os

import numpy as np

from sd_jax.errors import SDJaxError

__all__ = ["ControlImageError", "canny", "invert", "load_control_image", "resize_control_image"]


class ControlImageError(SDJaxError, ValueError):
    """A control image could not be read or has an unusable shape or range."""


def _is_pil(image) -> bool:
    return type(image).__module__.startswith("PIL.")


def _rgb(img):
    """Pillow's ``convert("RGB")``; 16- and 32-bit grayscale scaled to 8 bits first, not clipped at 255."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, np.float64)
        peak = 1.0 if img.mode == "F" and a.max() <= 1.0 else (65535.0 if a.max() <= 65535 else float(a.max()))
        img = Image.fromarray((np.clip(a / peak, 0.0, 1.0) * 255).round().astype(np.uint8), "L")
    return img.convert("RGB")


def load_control_image(image):
    """A file path, PIL image or array -> an RGB PIL image (8-bit input) or an HxWx3 float32 array in [0, 1].

    An unreadable file is a :class:`ControlImageError` naming it; grayscale arrays become 3 channels and RGBA
    arrays lose their alpha (as Pillow's ``convert("RGB")``)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return _rgb(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            reason = "no such file" if isinstance(e, FileNotFoundError) else (str(e).splitlines() or [""])[0]
            raise ControlImageError(f"control image {os.fspath(image)}: cannot be read ({reason})") from None
    if _is_pil(image):
        return _rgb(image)
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ControlImageError(f"control image has shape {a.shape}; pass HxW, HxWx1, HxWx3 or HxWx4")
    a = a[..., :3] if a.shape[-1] == 4 else np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
    if a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a))
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise ControlImageError(f"control image values span [{lo:g}, {hi:g}]; pass uint8 or floats in [0, 1]")
    return np.clip(a, 0.0, 1.0)


def _nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """``F.interpolate(x, size=(height, width))`` (mode "nearest": source index ``floor(i * in / out)``)."""
    rows = np.minimum(np.floor(np.arange(height) * (a.shape[0] / height)).astype(int), a.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (a.shape[1] / width)).astype(int), a.shape[1] - 1)
    return a[rows][:, cols]


def resize_control_image(image, height: int, width: int) -> np.ndarray:
    """Any control image (see :func:`load_control_image`) -> ``[height, width, 3]`` float32 in [0, 1], resized
    as diffusers' control image processor resizes it."""
    from PIL import Image

    image = load_control_image(image)
    if _is_pil(image):
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        return np.asarray(image, np.float32) / 255.0
    return image if image.shape[:2] == (height, width) else _nearest(image, height, width)


def _uint8(image) -> np.ndarray:
    a = np.asarray(load_control_image(image) if _is_pil(image) else image)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        a = np.clip(np.round(np.asarray(a, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return a[..., :3] if a.shape[-1] == 4 else a


_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # OpenCV's tan(22.5 deg) in Q15


def canny(image, low: float = 100, high: float = 200, *, l2_gradient: bool = False) -> np.ndarray:
    """OpenCV's ``cv2.Canny(image, low, high, L2gradient=l2_gradient)`` (aperture 3) on an HxW or HxWxC image
    (uint8, or floats in [0, 1], rounded to 8 bits first); returns the edge map as HxWx3 float32, 1 on edges."""
    from scipy import ndimage

    a = _uint8(image).astype(np.int32)
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.int32)
    dx = np.stack([ndimage.correlate(a[..., c], kx, mode="nearest") for c in range(a.shape[-1])], -1)
    dy = np.stack([ndimage.correlate(a[..., c], kx.T, mode="nearest") for c in range(a.shape[-1])], -1)
    mag = dx * dx + dy * dy if l2_gradient else np.abs(dx) + np.abs(dy)
    best = np.argmax(mag, axis=-1)[..., None]  # the channel of largest magnitude (the first on ties), as OpenCV
    dx, dy, mag = (np.take_along_axis(v, best, -1)[..., 0].astype(np.int64) for v in (dx, dy, mag))
    if low > high:
        low, high = high, low
    if l2_gradient:  # OpenCV compares squared magnitudes with squared thresholds
        low, high = min(32767.0, low) ** 2, min(32767.0, high) ** 2
    low, high = int(np.floor(low)), int(np.floor(high))
    m = np.pad(mag, 1)  # zeros outside the image
    h, w = mag.shape
    nb = lambda r, c: m[1 + r : 1 + r + h, 1 + c : 1 + c + w]  # noqa: E731  the neighbour at offset (r, c)
    xs, ys = np.abs(dx), np.abs(dy) << 15
    tg22x = xs * _TG22
    tg67x = tg22x + (xs << 16)
    horizontal = ys < tg22x
    vertical = ~horizontal & (ys > tg67x)
    s = np.where((dx < 0) != (dy < 0), -1, 1)
    diag_a = np.where(s > 0, nb(-1, -1), nb(-1, 1))  # the row above at x - s
    diag_b = np.where(s > 0, nb(1, 1), nb(1, -1))  # the row below at x + s
    peak = np.where(
        horizontal,
        (mag > nb(0, -1)) & (mag >= nb(0, 1)),
        np.where(vertical, (mag > nb(-1, 0)) & (mag >= nb(1, 0)), (mag > diag_a) & (mag > diag_b)),
    )
    candidate = peak & (mag > low)
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    strong = np.zeros(count + 1, bool)
    strong[np.unique(labels[candidate & (mag > high)])] = True
    strong[0] = False
    edges = strong[labels].astype(np.float32)
    return np.repeat(edges[..., None], 3, axis=-1)


def invert(image) -> np.ndarray:
    """``1 - image`` as HxWx3 float32 in [0, 1]: a dark-on-white scribble becomes the white-on-black map scribble
    (and HED/softedge) ControlNets take."""
    a = load_control_image(image)
    a = np.asarray(a, np.float32) / 255.0 if _is_pil(a) else a
    return (1.0 - a).astype(np.float32)
