"""mrcnn.imaging: resize modes, masks, molding, image_meta, file reading; Matterport reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from factories import make_config
from PIL import Image

from mrcnn import boxes as B
from mrcnn import imaging as I


@pytest.fixture(scope="module")
def ref(reference_dir):
    return np.load(reference_dir / "matterport_utils_reference.npz")


@pytest.fixture(scope="module")
def out(reference_dir):
    return np.load(reference_dir / "matterport_reference_outputs.npz")


# ---- resize_image modes (hand-computed windows, odd sizes) -------------------------------------

def _img(h, w):
    return (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)


def test_resize_none():
    im = _img(7, 5)
    res, window, scale, padding, crop = I.resize_image(im, 64, 128, mode="none")
    assert res is im and window == (0, 0, 7, 5) and scale == 1 and crop is None
    assert padding == [(0, 0), (0, 0), (0, 0)]


def test_resize_square_upscale_odd():
    # scale = 64/57 (min side to 64); 101*64/57 = 113.4 -> 113 rows; pad 15 rows = 7 top + 8 bottom.
    res, window, scale, padding, crop = I.resize_image(_img(101, 57), 64, 128, mode="square")
    assert res.shape == (128, 128, 3) and res.dtype == np.uint8
    assert scale == pytest.approx(64 / 57)
    assert padding == [(7, 8), (32, 32), (0, 0)]
    assert window == (7, 32, 120, 96) and crop is None
    assert not res[:7].any() and not res[120:].any() and not res[:, :32].any() and not res[:, 96:].any()


def test_resize_square_shrinks_to_max_dim():
    # min_dim never shrinks (scale 1) but 300 > 128 -> scale = 128/300; 151*0.4267 = 64.43 -> 64.
    res, window, scale, padding, _ = I.resize_image(_img(300, 151), 100, 128, mode="square")
    assert scale == pytest.approx(128 / 300)
    assert res.shape == (128, 128, 3) and window == (0, 32, 128, 96)
    assert padding == [(0, 0), (32, 32), (0, 0)]


def test_resize_square_round_half_even_and_min_scale():
    # min_scale 1.5: 3*1.5 = 4.5 -> 4 and 5*1.5 = 7.5 -> 8 (Python round); 64-4 = 60 -> 30/30; 56 -> 28/28.
    res, window, scale, padding, _ = I.resize_image(_img(3, 5), None, 64, min_scale=1.5, mode="square")
    assert scale == 1.5 and res.shape == (64, 64, 3)
    assert window == (30, 28, 34, 36)


def test_resize_pad64_odd():
    res, window, scale, padding, _ = I.resize_image(_img(101, 57), 64, 1024, mode="pad64")
    assert res.shape == (128, 64, 3) and window == (7, 0, 120, 64)
    assert padding == [(7, 8), (0, 0), (0, 0)]
    # no scaling (65 >= 64): 65 -> 128 rows (31 + 32), 130 -> 192 cols (31 + 31); max_dim ignored
    im = _img(65, 130)
    res, window, scale, padding, _ = I.resize_image(im, 64, 64, mode="pad64")
    assert scale == 1 and res.shape == (128, 192, 3)
    assert padding == [(31, 32), (31, 31), (0, 0)] and window == (31, 31, 96, 161)
    np.testing.assert_array_equal(res[31:96, 31:161], im)
    with pytest.raises(AssertionError):
        I.resize_image(im, 100, 128, mode="pad64")


def test_resize_crop():
    im = _img(100, 150)
    for _ in range(5):
        res, window, scale, padding, crop = I.resize_image(im, 64, 128, mode="crop")
        y, x, h, w = crop
        assert (h, w) == (64, 64) and window == (0, 0, 64, 64) and scale == 1
        assert 0 <= y <= 36 and 0 <= x <= 86
        np.testing.assert_array_equal(res, im[y:y + 64, x:x + 64])
    mask = np.zeros((100, 150, 1), bool)
    mask[y:y + 2, x:x + 3] = True
    assert I.resize_mask(mask, scale, padding, crop)[:, :, 0].sum() == 6


def test_resize_float_keeps_dtype_and_scaling():
    im = np.linspace(0, 1, 4 * 6, dtype=np.float32).reshape(4, 6, 1)
    res, *_ = I.resize_image(im, 8, 16, mode="square")
    assert res.dtype == np.float32 and res.shape == (16, 16, 1)
    # preserve_range=False rescales uint8 to [0, 1]; bool is read as 0/1
    r = I.resize(np.full((4, 4), 255, np.uint8), (2, 2))
    np.testing.assert_allclose(r, 1.0)
    assert I.resize(np.ones((4, 4), bool), (8, 8), preserve_range=True).min() == 1.0
    assert I.resize(np.ones((4, 4, 3)), (8, 8)).shape == (8, 8, 3)


# ---- masks -----------------------------------------------------------------------------------

def test_mini_mask_roundtrip_hand():
    mask = np.zeros((40, 50, 2), bool)
    mask[5:25, 10:40, 0] = True
    mask[30:33, 2:9, 1] = True
    bbox = B.extract_bboxes(mask)
    mini = I.minimize_mask(bbox, mask, (14, 14))
    assert mini.shape == (14, 14, 2) and mini.dtype == bool and mini.all()
    np.testing.assert_array_equal(I.expand_mask(bbox, mini, (40, 50, 3)), mask)
    with pytest.raises(Exception, match="area of zero"):
        I.minimize_mask(np.array([[3, 3, 3, 9]]), mask[..., :1], (14, 14))


def test_unmold_mask_hand():
    m = np.zeros((28, 28), np.float32)
    m[:, :14] = 1.0
    full = I.unmold_mask(m, (10, 20, 30, 60), (50, 80, 3))
    assert full.shape == (50, 80) and full.dtype == bool
    assert full[10:30, 20:40].all() and not full[10:30, 40:60].any()
    assert full.sum() == 20 * 20


# ---- molding and meta ------------------------------------------------------------------------

def test_shades_of_gray_turns_a_flat_cast_grey():
    # one colour everywhere: e_c = c / 255 (the 6-norm of a constant), gains mean(e) / e_c, so
    # every channel becomes the mean of (200, 100, 50) = 116.67
    image = np.broadcast_to(np.array([200, 100, 50], np.uint8), (4, 6, 3))
    np.testing.assert_allclose(I.shades_of_gray(image), np.full((4, 6, 3), 350 / 3), rtol=1e-12)


def test_shades_of_gray_removes_a_white_balance_change_and_ignores_padding():
    rng = np.random.default_rng(1)
    image = rng.integers(20, 180, (30, 40, 3)).astype(np.float64)
    cast = image * np.array([1.3, 1.0, 0.7])  # another camera's white balance (stays < 255)
    # the same colours, up to one brightness factor (the mean illuminant, (1.3 e_r + e_g + 0.7 e_b) / 3)
    ratio = I.shades_of_gray(cast) / I.shades_of_gray(image)
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-9)
    assert 0.9 < ratio.flat[0] < 1.1
    padded = np.pad(image, ((5, 5), (0, 0), (0, 0)))  # the square molding's black bars
    np.testing.assert_allclose(I.shades_of_gray(padded)[5:-5], I.shades_of_gray(image), rtol=1e-9)
    assert (I.shades_of_gray(padded)[:5] == 0).all()


def test_shades_of_gray_gains_are_clipped_and_black_stays_black():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0], red[..., 1], red[..., 2] = 240, 10, 10  # nearly one colour: gains would be ~0.4 / 10 / 10
    gains = I.shades_of_gray_gains(red).reshape(3)
    np.testing.assert_allclose(gains, [(240 + 20) / 3 / 240, 3.0, 3.0])
    assert (I.shades_of_gray(np.zeros((5, 5, 3), np.uint8)) == 0).all()


def test_mold_image_applies_colour_constancy_only_when_asked():
    image = np.broadcast_to(np.array([200, 100, 50], np.uint8), (4, 4, 3))
    plain, sog = make_config("coco"), make_config("coco", COLOUR_CONSTANCY="shades_of_gray")
    np.testing.assert_allclose(I.mold_image(image, plain)[0, 0], [200 - 123.7, 100 - 116.8, 50 - 103.9])
    np.testing.assert_allclose(I.mold_image(image, sog)[0, 0], 350 / 3 - sog.MEAN_PIXEL)


def test_mold_unmold_and_meta_roundtrip():
    cfg = make_config("coco")
    im = _img(4, 5)
    molded = I.mold_image(im, cfg)
    assert molded.dtype == np.float64
    np.testing.assert_array_equal(I.unmold_image(molded, cfg), im)
    meta = I.compose_image_meta(7, (200, 300, 3), (256, 256, 3), (42, 0, 213, 256), 0.85, np.ones(81))
    assert meta.shape == (cfg.IMAGE_META_SIZE,)
    p = I.parse_image_meta(meta[None])
    assert p["image_id"].tolist() == [7] and p["scale"].dtype == np.float32
    np.testing.assert_array_equal(p["window"], [[42, 0, 213, 256]])
    np.testing.assert_array_equal(p["original_image_shape"], [[200, 300, 3]])
    assert p["active_class_ids"].shape == (1, 81)
    g = I.parse_image_meta_graph(tf.constant(meta[None], tf.float32))
    assert set(g) == set(p)
    np.testing.assert_array_equal(g["image_shape"].numpy(), [[256, 256, 3]])
    np.testing.assert_allclose(g["scale"].numpy(), [0.85])


# ---- Matterport reference: all bit-exact (scipy zoom grid_mode is skimage's own resampler) -------

CASES = {
    "square_256": (256, 256, "square"),
    "square_800_1024": (800, 1024, "square"),
    "pad64_256": (256, 256, "pad64"),
    "none": (256, 256, "none"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_resize_image_and_mask(ref, out, case):
    min_dim, max_dim, mode = CASES[case]
    image, window, scale, padding, crop = I.resize_image(out["image"], min_dim, max_dim, 0, mode)
    # No tolerance needed: the bilinear resampling is the same scipy routine scikit-image uses.
    np.testing.assert_array_equal(image, ref[f"resize_{case}_image"])
    np.testing.assert_array_equal(window, ref[f"resize_{case}_window"])
    assert scale == ref[f"resize_{case}_scale"]
    np.testing.assert_array_equal(np.array(padding), ref[f"resize_{case}_padding"])
    mask = I.resize_mask(ref["gt_masks_original"], scale, padding, crop)
    np.testing.assert_array_equal(mask, ref[f"resize_{case}_mask"])


def test_reference_mini_masks(ref):
    bbox, mask = ref["resize_square_256_bbox"], ref["resize_square_256_mask"]
    mini = I.minimize_mask(bbox, mask, (56, 56))
    np.testing.assert_array_equal(mini, ref["minimize_mask_56"])
    np.testing.assert_array_equal(mini, ref["load_image_gt_mini_mask"])
    np.testing.assert_array_equal(I.expand_mask(bbox, ref["minimize_mask_56"], (256, 256)), ref["expand_mask_256"])


def test_reference_mold_and_meta(out):
    cfg = make_config("coco")
    image, window, scale, _, _ = I.resize_image(out["image"], 256, 256, 0, "square")
    # the model input is float32; mold_image itself returns float64 like Matterport
    np.testing.assert_array_equal(I.mold_image(image, cfg).astype(np.float32), out["molded_image"][0])
    meta = I.compose_image_meta(0, out["image"].shape, image.shape, window, scale, np.zeros(81))
    np.testing.assert_array_equal(meta, out["image_meta"][0])


def test_reference_unmold_masks(out):
    # detect() pasted each detection's own-class 28x28 mask into its box; all 100 are bit-exact.
    rois, masks, full = out["detect_rois"], out["mrcnn_mask_detected_class"][0], out["detect_masks"]
    for i in range(rois.shape[0]):
        np.testing.assert_array_equal(I.unmold_mask(masks[i], rois[i], full.shape[:2]), full[..., i])


# ---- reading files ---------------------------------------------------------------------------

def _save(path, img, fmt, **kw):
    img.save(path, fmt, **kw)
    return path


def test_read_image_modes(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, :4] = (200, 10, 30)
    got = I.read_image(_save(tmp_path / "a.png", Image.fromarray(rgb), "PNG"))
    assert got.dtype == np.uint8 and got.shape == (6, 8, 3)
    np.testing.assert_array_equal(got, rgb)

    rgba = np.dstack([rgb, np.full((6, 8), 7, np.uint8)])
    np.testing.assert_array_equal(I.read_image(_save(tmp_path / "b.png", Image.fromarray(rgba), "PNG")), rgb)

    gray = np.tile(np.arange(8, dtype=np.uint8) * 30, (6, 1))
    got = I.read_image(_save(tmp_path / "g.png", Image.fromarray(gray), "PNG"))
    np.testing.assert_array_equal(got, np.dstack([gray] * 3))

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    np.testing.assert_array_equal(I.read_image(_save(tmp_path / "p.png", pal, "PNG")), rgb)

    g16 = (np.tile(np.arange(8, dtype=np.uint16), (6, 1)) * 9000).astype(np.uint16)
    got = I.read_image(_save(tmp_path / "g16.png", Image.fromarray(g16), "PNG"))
    assert got.dtype == np.uint8 and got.shape == (6, 8, 3)
    np.testing.assert_array_equal(got[..., 0], np.round(g16 * 255.0 / 65535).astype(np.uint8))

    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    got = I.read_image(_save(tmp_path / "c.jpg", cmyk, "JPEG", quality=95))
    assert got.shape == (6, 8, 3)
    # JPEG is lossy: red within a few grey levels
    assert got[..., 0].min() > 240 and got[..., 1:].max() < 15


def test_read_image_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # white left half
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    path = _save(tmp_path / "rot.jpg", img, "JPEG", exif=exif.tobytes(), quality=95)
    got = I.read_image(path)
    assert got.shape == (40, 20, 3)
    # clockwise rotation puts the stored left half at the top
    assert got[:15].mean() > 240 and got[25:].mean() < 15


def test_read_image_errors(tmp_path):
    with pytest.raises(I.ImageReadError, match="not found"):
        I.read_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(I.ImageReadError, match="empty"):
        I.read_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    with pytest.raises(I.ImageReadError, match="not a recognised image"):
        I.read_image(tmp_path / "text.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(I.ImageReadError, match="truncated") as e:
        I.read_image(tmp_path / "cut.jpg")
    assert "cut.jpg" in str(e.value) and "\n" not in str(e.value)
    assert issubclass(I.ImageReadError, ValueError)
    with pytest.raises(I.ImageReadError):
        I.read_mask(tmp_path / "empty.jpg")


def test_read_mask(tmp_path):
    # One rule (training, prediction, scoring): 8-bit lesion is > 128, the official ISIC scorer's.
    m = np.array([[0, 127, 128, 129, 255]], np.uint8)
    np.testing.assert_array_equal(I.read_mask(_save(tmp_path / "m.png", Image.fromarray(m), "PNG")),
                                  [[False, False, False, True, True]])
    rgb = np.dstack([m] * 3)  # grey saved as RGB: channels equal -> grey, not colour
    assert I.read_mask_and_colour(_save(tmp_path / "m3.png", Image.fromarray(rgb), "PNG"))[1] is None
    np.testing.assert_array_equal(I.read_mask(tmp_path / "m3.png"), [[False, False, False, True, True]])
    labels = np.array([[0, 1, 1, 0]], np.uint8)  # 0/1 label mask: > 0
    np.testing.assert_array_equal(I.read_mask(_save(tmp_path / "l.png", Image.fromarray(labels), "PNG")),
                                  [[False, True, True, False]])
    wide = np.array([[0, 300, 32896, 32897, 65535]], np.uint16)  # 16-bit: > 128 * 257 = 32896
    np.testing.assert_array_equal(I.read_mask(_save(tmp_path / "w.png", Image.fromarray(wide), "PNG")),
                                  [[False, False, False, True, True]])
    one = Image.fromarray(np.array([[True, False]])).convert("1")
    got = I.read_mask(_save(tmp_path / "m1.png", one, "PNG"))
    assert got.dtype == bool and got.tolist() == [[True, False]]


def test_read_colour_masks(tmp_path):
    # A red lesion on black was EMPTY as luminance (76 < 128); now lesion where any channel > 128.
    red = np.zeros((2, 3, 3), np.uint8)
    red[0, :2] = (255, 0, 0)
    red[1, 0] = (0, 129, 0)
    red[1, 1] = (128, 128, 0)  # no channel above 128
    mask, colour = I.read_mask_and_colour(_save(tmp_path / "red.png", Image.fromarray(red), "PNG"))
    assert colour == "RGB" and mask.tolist() == [[True, True, False], [True, False, False]]
    rgba = np.dstack([red, np.zeros((2, 3), np.uint8)])  # alpha ignored, even fully transparent
    mask, colour = I.read_mask_and_colour(_save(tmp_path / "red_a.png", Image.fromarray(rgba), "PNG"))
    assert colour == "RGBA" and mask.tolist() == [[True, True, False], [True, False, False]]
    assert I.read_mask(tmp_path / "red.png").tolist() == mask.tolist()
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)  # index 1 = dark red
    assert I.read_mask_and_colour(_save(tmp_path / "p.png", palette, "PNG"))[0].tolist() == [[False, True]]


def test_binarize_mask_rule():
    assert I.binarize_mask(np.array([0, 127, 128, 129, 255], np.uint8)).tolist() == [False, False, False, True, True]
    assert I.binarize_mask(np.array([0, 1], np.uint8)).tolist() == [False, True]
    assert I.binarize_mask(np.array([0, 255, 32896, 32897], np.uint16)).tolist() == [False, False, False, True]
    assert I.binarize_mask(np.array([0, 200], np.uint16)).tolist() == [False, True]  # 8-bit values in 16 bits
    assert I.binarize_mask(np.zeros(3, np.uint8)).tolist() == [False] * 3
    assert I.binarize_mask(np.array([False, True])).tolist() == [False, True]


def test_to_rgb():
    g = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(I.to_rgb(g), [[[0, 0, 0], [255, 255, 255]]])
    assert I.to_rgb(g[..., None]).shape == (1, 2, 3)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[..., 3] = 255
    assert I.to_rgb(rgba).shape == (1, 2, 3)
    np.testing.assert_array_equal(I.to_rgb(np.array([[0, 65535]], np.uint16))[..., 0], [[0, 255]])
    np.testing.assert_array_equal(I.to_rgb(np.array([[0.0, 0.5, 1.0]]))[..., 0], [[0, 128, 255]])
    np.testing.assert_array_equal(I.to_rgb(np.array([[0.0, 300.0]]))[..., 0], [[0, 255]])
    with pytest.raises(ValueError):
        I.to_rgb(np.zeros((2, 2, 5)))


def test_resize_of_an_empty_instance_axis_warns_nothing_and_keeps_it_empty():
    import warnings

    from mrcnn.imaging import resize

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old code divided by the empty axis (RuntimeWarning)
        out = resize(np.zeros((10, 12, 0), bool), (5, 6, 0), anti_aliasing=True)
        smooth = resize(np.eye(8), (4, 4), anti_aliasing=True, preserve_range=True)
    assert out.shape == (5, 6, 0)
    # scikit-image's default sigma (in / out - 1) / 2 = 0.5 per axis for 8 -> 4
    explicit = resize(np.eye(8), (4, 4), anti_aliasing=True, anti_aliasing_sigma=[0.5, 0.5], preserve_range=True)
    np.testing.assert_array_equal(smooth, explicit)
    assert not np.array_equal(smooth, resize(np.eye(8), (4, 4), preserve_range=True))
