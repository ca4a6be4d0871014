"""What inpainting's masked area starts from: A1111's "Masked content" (``inpainting_fill``), and its "Only masked"
inpaint area (``inpaint_full_res``) as a crop box.

- ``original`` (A1111's 1): the image as it is (diffusers' behaviour).
- ``fill`` (0): the masked pixels are replaced by the colours around them, blurred in from ever smaller radii
  (a normalized convolution: the known pixels' blur divided by the blur of where they are), before encoding.
- ``latent_noise`` (2): ``fill``, then the masked latents are replaced by the start noise (the seed's).
- ``latent_nothing`` (3): ``fill``, then the masked latents are zero.

The mode changes only what the init latents hold in the masked area, so it matters with ``strength < 1``.
"""

from __future__ import annotations

import numpy as np

MODES = ("original", "fill", "latent_noise", "latent_nothing")
FROM_A1111 = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
LABELS = {"fill": "fill", "latent_noise": "latent noise", "latent_nothing": "latent nothing"}  # infotext values
_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2))  # (blur radius, times laid over): coarse to fine


def check(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"masked_content={mode!r} is not one of {', '.join(MODES)}")


def fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` ([N, H, W, 3] in [0, 1]) with the pixels where ``mask`` ([N, H, W, 1], 1 = masked) is set painted
    from their surroundings; the known pixels stay as they are."""
    from scipy.ndimage import gaussian_filter

    image, known = np.asarray(image, np.float32), 1.0 - (np.asarray(mask, np.float32) >= 0.5)
    out, out_a = np.zeros_like(image), np.zeros_like(known)
    size = max(image.shape[1:3])
    for radius, times in _PASSES:
        sigma, reach = (0, radius, radius, 0), min(4.0, size / radius)  # the kernel no wider than the image
        a = gaussian_filter(known, sigma, mode="constant", truncate=reach)
        colour = gaussian_filter(image * known, sigma, mode="constant", truncate=reach) / np.maximum(a, 1e-6)
        a = np.clip(a, 0.0, 1.0)
        for _ in range(times):  # lay the blurred layer over what is there ("over" compositing)
            new_a = a + out_a * (1 - a)
            out = (colour * a + out * out_a * (1 - a)) / np.maximum(new_a, 1e-6)
            out_a = new_a
    return known * image + (1 - known) * out


def latents(z0, noise, small_mask, mode: str):
    """The init latents of ``mode`` (``z0`` encoded from the filled image; ``small_mask`` at the latents' size)."""
    if mode == "latent_noise":
        return z0 * (1 - small_mask) + noise * small_mask
    if mode == "latent_nothing":
        return z0 * (1 - small_mask)
    return z0


def crop_box(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's "Only masked" region: the mask's bounding box (``mask`` [H, W], > 0 = masked) grown by ``padding``,
    then widened or heightened to the ``width``:``height`` aspect it is sampled at, within the image. ``(x0, y0,
    x1, y1)``, end exclusive; the whole image when nothing is masked."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask > 0)
    if not len(ys):
        return 0, 0, w, h
    x0, y0 = max(int(xs.min()) - padding, 0), max(int(ys.min()) - padding, 0)
    x1, y1 = min(int(xs.max()) + 1 + padding, w), min(int(ys.max()) + 1 + padding, h)

    def grow(lo, hi, want, limit):
        want = min(want, limit)
        lo = max(min(lo - (want - (hi - lo)) // 2, limit - want), 0)
        return lo, lo + want

    if (x1 - x0) * height > (y1 - y0) * width:  # wider than the sampling aspect: add rows
        y0, y1 = grow(y0, y1, round((x1 - x0) * height / width), h)
    else:
        x0, x1 = grow(x0, x1, round((y1 - y0) * width / height), w)
    return x0, y0, x1, y1
