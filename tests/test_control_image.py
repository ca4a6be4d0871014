"""Control images: reading, diffusers' resize, canny (OpenCV's semantics, against scikit-image) and invert."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data, feature

from sd_jax.control_image import ControlImageError, canny, invert, load_control_image, resize_control_image


def test_canny_agrees_with_skimage_on_camera():
    """skimage.feature.canny (sigma 0: no smoothing, as OpenCV; L2 magnitude; interpolated non-maximum
    suppression) against ours with OpenCV's L2 gradient: 99.2% of pixels agree, 98% of our edge pixels are within
    one pixel of one of theirs and 95% of theirs of ours (they differ where the quantised and the interpolated
    suppression keep neighbouring pixels)."""
    img = data.camera()
    ours = canny(img, 100, 200, l2_gradient=True)[..., 0] > 0
    ref = feature.canny(img.astype(float), sigma=0.0, low_threshold=100, high_threshold=200)
    near = lambda a: ndimage.binary_dilation(a, np.ones((3, 3), bool))  # noqa: E731
    agree = (ours == ref).mean()
    ours_near, ref_near = (ours & near(ref)).sum() / ours.sum(), (ref & near(ours)).sum() / ref.sum()
    print(f"pixels {agree:.4f}, ours near theirs {ours_near:.3f}, theirs near ours {ref_near:.3f}")
    assert agree >= 0.99 and ours_near >= 0.97 and ref_near >= 0.94
    default = canny(img)  # OpenCV's default L1 gradient: a larger magnitude, so more edges at 100/200
    assert default.shape == (512, 512, 3) and default.dtype == np.float32
    assert set(np.unique(default)) <= {0.0, 1.0} and (default[..., 0] > 0).sum() > ours.sum()


def step(contrast, size=16):
    img = np.full((size, size), 100, np.uint8)
    img[:, size // 2 :] = 100 + contrast
    return img


def test_canny_thresholds_and_width_follow_opencv():
    # a vertical step of c gives Sobel |dx| = 4c on the two columns beside it; non-maximum suppression keeps the
    # left one (strict > on the left neighbour, >= on the right), so the edge is one pixel wide
    e = canny(step(60))[..., 0]  # 240 > high 200
    assert np.array_equal(np.nonzero(e.any(0))[0], [7]) and e[:, 7].all()
    assert not canny(step(40)).any()  # 160: above low 100 but nothing strong to grow from
    assert canny(step(40), 100, 150).any()
    # hysteresis: the weak part of a line is kept when it touches a strong part (8-connected)
    img = step(40)
    img[:4, 8:] = 160  # the top rows have contrast 60
    e = canny(img)[..., 0]
    assert e[6:, 7].all()  # the weak rows, kept through the strong ones


def test_canny_takes_colour_and_floats():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, 8:, 2] = 200  # an edge in the blue channel only: OpenCV takes each pixel's strongest channel
    assert canny(rgb)[:, 7].all()
    np.testing.assert_array_equal(canny(rgb.astype(np.float32) / 255), canny(rgb))


def test_resize_is_diffusers_control_image_processor(tmp_path):
    rgb = data.astronaut()[::8, ::8]  # 64x64
    Image.fromarray(rgb).save(tmp_path / "a.png")
    want = np.asarray(Image.fromarray(rgb).resize((40, 24), Image.LANCZOS), np.float32) / 255
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb):
        np.testing.assert_array_equal(resize_control_image(src, 24, 40), want)
    floats = rgb.astype(np.float32) / 255  # float arrays: torch's interpolate, nearest
    out = resize_control_image(floats, 32, 16)
    np.testing.assert_array_equal(out, floats[::2, ::4])
    assert resize_control_image(floats, 64, 64) is floats or np.array_equal(
        resize_control_image(floats, 64, 64), floats
    )


@pytest.mark.live
def test_resize_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    img = Image.fromarray(data.coffee()[::5, ::5])
    want = proc.preprocess(img, height=48, width=64).numpy()[0].transpose(1, 2, 0)
    np.testing.assert_allclose(resize_control_image(img, 48, 64), want, atol=1e-6)
    floats = np.asarray(img, np.float32) / 255
    want = proc.preprocess(floats[None], height=48, width=64).numpy()[0].transpose(1, 2, 0)
    np.testing.assert_allclose(resize_control_image(floats, 48, 64), want, atol=1e-6)


def test_modes_and_errors(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.zeros_like(gray)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    for name in ("g.png", "rgba.png", "g16.png"):
        out = resize_control_image(tmp_path / name, 8, 8)
        np.testing.assert_allclose(out, np.repeat(gray[..., None], 3, -1) / 255, atol=1 / 255, err_msg=name)
    np.testing.assert_allclose(invert(tmp_path / "g.png"), 1 - np.repeat(gray[..., None], 3, -1) / 255, atol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ControlImageError, match=r"control image .*bad.png: cannot be read"):
        load_control_image(tmp_path / "bad.png")
    with pytest.raises(ControlImageError, match=r"control image .*none.png: cannot be read \(no such file\)"):
        load_control_image(tmp_path / "none.png")
    with pytest.raises(ControlImageError, match="values span"):
        load_control_image(np.full((4, 4, 3), 2.0, np.float32))
    with pytest.raises(ControlImageError, match="shape"):
        load_control_image(np.zeros((4, 4, 2)))
