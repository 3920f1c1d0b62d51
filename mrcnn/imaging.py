"""Image and mask resampling, molding, image_meta, and robust file reading.

Boxes and windows are (y1, x1, y2, x2) in pixels with exclusive y2/x2. Images are [H, W, C];
instance masks are bool [H, W, N].

Bilinear resampling follows scikit-image's ``resize`` (order 1, pixel-centre grid, no
anti-aliasing, "constant" mode = zero outside the image) by calling ``scipy.ndimage.zoom`` with
``grid_mode=True``, which is the routine scikit-image itself uses, so results match Matterport's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mrcnn.errors import UserError

logger = logging.getLogger(__name__)

#: Never let Pillow silently return a partially decoded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_NDIMAGE_MODES = {"constant": "grid-constant", "edge": "nearest", "symmetric": "reflect",
                  "reflect": "mirror", "wrap": "grid-wrap"}


class ImageReadError(UserError):
    """An image or mask file is missing, empty, truncated or not an image."""


# --------------------------------------------------------------------------------------------
# Resampling


def _zoom_input(image: np.ndarray, preserve_range: bool) -> np.ndarray:
    """The array scipy should resample: values as scikit-image sees them, copied only when needed.

    bool -> uint8 0/1 and preserve-range integers are passed as they are (scipy reads them as
    doubles, so no float64 copy of a large photo is made); without preserve_range integers are
    scaled to [0, 1] by their dtype max; float16 is widened.
    """
    if image.dtype == bool:
        return image.view(np.uint8)
    if image.dtype.kind in "ui" and not preserve_range:
        return image.astype(np.float64) / np.iinfo(image.dtype).max
    if image.dtype.kind not in "uif" or image.dtype == np.float16:
        return image.astype(np.float64)
    return image


def resize(image: np.ndarray, output_shape: Sequence[int], order: int = 1, mode: str = "constant",
           cval: float = 0, clip: bool = True, preserve_range: bool = False, anti_aliasing: bool = False,
           anti_aliasing_sigma: Any = None) -> np.ndarray:
    """Resample image [H, W(, C)] to output_shape (h, w[, C]) -> float64, scikit-image semantics.

    Samples on the pixel-centre grid; "constant" mode treats outside pixels as cval. Bool input is
    treated as 0/1 floats. Without preserve_range integer images are scaled to [0, 1] first. The
    output is clipped to the input's value range (clip=True).
    """
    x = _zoom_input(np.asarray(image), preserve_range)
    out_shape = tuple(int(s) for s in output_shape)
    if len(out_shape) == x.ndim - 1:
        out_shape = out_shape + x.shape[len(out_shape):]
    assert len(out_shape) == x.ndim, f"output_shape {output_shape} does not fit image of shape {x.shape}"
    ndi_mode = _NDIMAGE_MODES.get(mode, mode)
    lo, hi = (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)
    if anti_aliasing:
        sigma = anti_aliasing_sigma if anti_aliasing_sigma is not None else _anti_aliasing_sigma(x.shape, out_shape)
        x = scipy.ndimage.gaussian_filter(x.astype(np.float64), sigma, cval=cval, mode=ndi_mode)
    if out_shape == x.shape:
        out = x.astype(np.float64)
    else:
        out = _zoom(x, out_shape, order, ndi_mode, cval)
    if clip and order > 0 and x.size:
        _clip_to_input_range(out, lo, hi, mode, cval)
    return out


def _anti_aliasing_sigma(in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """scikit-image's default Gaussian sigma per axis, max(0, (in / out - 1) / 2); an empty output
    axis (size 0, e.g. no instances) gets 0 instead of a division by zero."""
    size_in, size_out = np.asarray(in_shape, np.float64), np.asarray(out_shape, np.float64)
    factors = np.divide(size_in, size_out, out=np.ones_like(size_in), where=size_out > 0)
    return np.maximum(0, (factors - 1) / 2)


def _zoom(x: np.ndarray, out_shape: tuple[int, ...], order: int, ndi_mode: str, cval: float) -> np.ndarray:
    """scipy zoom on the pixel-centre grid to out_shape (float64). Channels of [H, W, C] images that
    keep C are zoomed one by one: identical values (the channel weight is exactly 1), half the work."""
    def zoom(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        factors = np.array(shape, dtype=np.float64) / np.array(a.shape, dtype=np.float64)
        return scipy.ndimage.zoom(a, factors, output=np.float64, order=order, mode=ndi_mode, cval=cval,
                                  grid_mode=True)

    if x.ndim == 3 and out_shape[2] == x.shape[2]:
        out = np.empty(out_shape, dtype=np.float64)
        for c in range(x.shape[2]):
            out[..., c] = zoom(x[..., c], out_shape[:2])
    else:
        out = zoom(x, out_shape)
    assert out.shape == out_shape, (out.shape, out_shape)
    return out


def _clip_to_input_range(out: np.ndarray, lo: float, hi: float, mode: str, cval: float) -> None:
    """Clip out (in place) to the input's [lo, hi]; in "constant" mode pixels equal to an
    out-of-range cval keep it (scikit-image semantics: a mask whose values are all >= 0.56
    stays >= 0.56 at the zero-blended borders)."""
    keep_cval = mode == "constant" and not (lo <= cval <= hi) and out.size and out.min() <= cval <= out.max()
    cval_mask = out == cval if keep_cval else None
    np.clip(out, lo, hi, out=out)
    if cval_mask is not None:
        out[cval_mask] = cval


def resize_image(image: np.ndarray, min_dim: int | None = None, max_dim: int | None = None,
                 min_scale: float | None = None, mode: str = "square"
                 ) -> tuple[np.ndarray, tuple[int, int, int, int], float, list[tuple[int, int]], Any]:
    """Resize and pad image [H, W, C] -> (image, window, scale, padding, crop), Matterport semantics.

    window = (y1, x1, y2, x2) of the image inside the result; padding = [(top, bottom),
    (left, right), (0, 0)]; crop = (y, x, h, w) in "crop" mode else None. Modes: "none",
    "square" (pad to max_dim x max_dim), "pad64" (pad each side to a multiple of 64), "crop"
    (random min_dim x min_dim crop). Only "square" shrinks (to fit max_dim). The result keeps the
    input dtype (float -> integer truncates).
    """
    dtype = image.dtype
    h, w = image.shape[:2]
    window = (0, 0, h, w)
    padding = [(0, 0), (0, 0), (0, 0)]
    if mode == "none":
        return image, window, 1, padding, None
    scale = _resize_scale(h, w, min_dim, max_dim, min_scale, mode)
    if scale != 1:
        image = resize(image, (round(h * scale), round(w * scale)), preserve_range=True)
    h, w = image.shape[:2]
    crop = None
    if mode == "square":
        padding = [_split(max_dim - h), _split(max_dim - w), (0, 0)]
    elif mode == "pad64":
        assert min_dim % 64 == 0, "Minimum dimension must be a multiple of 64"
        padding = [_split(-h % 64), _split(-w % 64), (0, 0)]
    elif mode == "crop":
        y = random.randint(0, h - min_dim)
        x = random.randint(0, w - min_dim)
        crop = (y, x, min_dim, min_dim)
        image = image[y:y + min_dim, x:x + min_dim]
        return image.astype(dtype), (0, 0, min_dim, min_dim), scale, padding, crop
    else:
        raise Exception(f"Mode {mode} not supported")
    image = np.pad(image, padding[:image.ndim], mode="constant", constant_values=0)
    window = (padding[0][0], padding[1][0], h + padding[0][0], w + padding[1][0])
    return image.astype(dtype), window, scale, padding, crop


def _resize_scale(h: int, w: int, min_dim: int | None, max_dim: int | None, min_scale: float | None,
                  mode: str) -> float:
    """Scale factor of resize_image: up to min_dim (never shrinks), >= min_scale, square fits max_dim."""
    scale = 1
    if min_dim:
        scale = max(1, min_dim / min(h, w))
    if min_scale and scale < min_scale:
        scale = min_scale
    if max_dim and mode == "square":
        if round(max(h, w) * scale) > max_dim:
            scale = max_dim / max(h, w)
    return scale


def _split(total: int) -> tuple[int, int]:
    """Split padding total into (first, second) with the extra pixel second."""
    return total // 2, total - total // 2


def resize_mask(mask: np.ndarray, scale: float, padding: Sequence[Sequence[int]], crop: Any = None) -> np.ndarray:
    """Resize masks [H, W, N] by scale (nearest, scipy zoom grid) then crop or zero-pad like the image."""
    mask = scipy.ndimage.zoom(mask, zoom=[scale, scale, 1], order=0)
    if crop is not None:
        y, x, h, w = crop
        return mask[y:y + h, x:x + w]
    return np.pad(mask, padding, mode="constant", constant_values=0)


def minimize_mask(bbox: np.ndarray, mask: np.ndarray, mini_shape: Sequence[int]) -> np.ndarray:
    """Crop each mask [H, W, N] to its box [N, 4] and resize to mini_shape -> bool [mh, mw, N]."""
    mini = np.zeros(tuple(mini_shape) + (mask.shape[-1],), dtype=bool)
    for i in range(mask.shape[-1]):
        y1, x1, y2, x2 = bbox[i][:4]
        m = mask[y1:y2, x1:x2, i].astype(bool)
        if m.size == 0:
            raise Exception("Invalid bounding box with area of zero")
        mini[:, :, i] = np.around(resize(m, mini_shape)).astype(bool)
    return mini


def expand_mask(bbox: np.ndarray, mini_mask: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """Paste mini masks [mh, mw, N] back into full-size bool masks [H, W, N] at boxes [N, 4]."""
    mask = np.zeros(tuple(image_shape[:2]) + (mini_mask.shape[-1],), dtype=bool)
    for i in range(mask.shape[-1]):
        y1, x1, y2, x2 = bbox[i][:4]
        m = resize(mini_mask[:, :, i], (y2 - y1, x2 - x1))
        mask[y1:y2, x1:x2, i] = np.around(m).astype(bool)
    return mask


def unmold_mask(mask: np.ndarray, bbox: Sequence[int], image_shape: Sequence[int],
                threshold: float = 0.5) -> np.ndarray:
    """Float mask [mh, mw] (e.g. 28x28) -> bool [H, W]: resized into bbox (y1, x1, y2, x2), >= threshold."""
    y1, x1, y2, x2 = (int(v) for v in bbox)
    m = resize(mask, (y2 - y1, x2 - x1)) >= threshold
    full = np.zeros(tuple(image_shape[:2]), dtype=bool)
    full[y1:y2, x1:x2] = m
    return full


# --------------------------------------------------------------------------------------------
# Molding and image_meta


#: Minkowski norm of the Shades of Gray illuminant estimate (6: Finlayson & Trezzi 2004; Barata et
#: al. 2015 for dermoscopy).
SHADES_OF_GRAY_POWER = 6
#: The channel gains of Shades of Gray are clipped to [1 / 3, 3]: a photo that is nearly one colour
#: (a close-up of a red lesion) is not pushed to extremes.
SHADES_OF_GRAY_MAX_GAIN = 3.0


def shades_of_gray_gains(images: np.ndarray, power: int = SHADES_OF_GRAY_POWER) -> np.ndarray:
    """Per-image channel gains [..., 1, 1, 3] of Shades of Gray colour constancy for RGB images
    [..., H, W, 3] (0..255): the illuminant e_c = (mean over pixels of (I_c / 255)^p)^(1/p), the gain
    mean(e) / e_c, clipped to [1/3, 3]. Black pixels (zero padding) scale every e_c alike, so they
    do not change the gains."""
    x = np.asarray(images, np.float64) / 255.0
    illuminant = np.mean(x ** power, axis=(-3, -2), keepdims=True) ** (1.0 / power)
    gains = illuminant.mean(axis=-1, keepdims=True) / np.maximum(illuminant, 1e-12)
    return np.clip(gains, 1.0 / SHADES_OF_GRAY_MAX_GAIN, SHADES_OF_GRAY_MAX_GAIN)


def shades_of_gray(images: np.ndarray) -> np.ndarray:
    """RGB images [..., H, W, 3] (0..255) -> float64, each image's colour cast removed (Shades of
    Gray: channels scaled by :func:`shades_of_gray_gains`), clipped to 0..255."""
    x = np.asarray(images, np.float64)
    return np.clip(x * shades_of_gray_gains(x), 0.0, 255.0)  # gains read x as is: one conversion


def mold_image(images: np.ndarray, config: Any) -> np.ndarray:
    """RGB images [..., 3] -> the network's input (float64): the colour cast removed where
    config.COLOUR_CONSTANCY is "shades_of_gray", then config.MEAN_PIXEL subtracted (no std division)."""
    if config.COLOUR_CONSTANCY == "shades_of_gray":
        return shades_of_gray(images) - config.MEAN_PIXEL
    return images.astype(np.float32) - config.MEAN_PIXEL


def unmold_image(normalized_images: np.ndarray, config: Any) -> np.ndarray:
    """Inverse of mold_image -> uint8 (the colours as the network saw them: a COLOUR_CONSTANCY
    correction is not undone)."""
    return (normalized_images + config.MEAN_PIXEL).astype(np.uint8)


def compose_image_meta(image_id: int, original_image_shape: Sequence[int], image_shape: Sequence[int],
                       window: Sequence[int], scale: float, active_class_ids: Sequence[int]) -> np.ndarray:
    """image_meta [12 + NUM_CLASSES]: id, original (h, w, c), molded (h, w, c), window, scale, active ids."""
    return np.array([image_id] + list(original_image_shape) + list(image_shape) + list(window)
                    + [scale] + list(active_class_ids))


def _meta_fields(meta: Any) -> dict[str, Any]:
    return {
        "image_id": meta[..., 0],
        "original_image_shape": meta[..., 1:4],
        "image_shape": meta[..., 4:7],
        "window": meta[..., 7:11],
        "scale": meta[..., 11],
        "active_class_ids": meta[..., 12:],
    }


def parse_image_meta(meta: np.ndarray) -> dict[str, np.ndarray]:
    """Split image_meta [B, META] (or [META]) into a dict; int32 fields except scale (float32)."""
    fields = _meta_fields(np.asarray(meta))
    return {k: v.astype(np.float32 if k == "scale" else np.int32) for k, v in fields.items()}


def parse_image_meta_graph(meta: Any) -> dict[str, Any]:
    """Split an image_meta tensor [B, META] into a dict of tensors (dtype unchanged)."""
    return _meta_fields(meta)


# --------------------------------------------------------------------------------------------
# Reading files


def to_rgb(image: np.ndarray) -> np.ndarray:
    """In-memory image (gray [H, W] / [H, W, 1], RGB, RGBA, uint16, float) -> uint8 [H, W, 3].

    uint16 and other wide integers are scaled by their max; floats in [0, 1] are scaled by 255,
    other floats are clipped to [0, 255]. Alpha is dropped.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"cannot convert an array of shape {image.shape} to RGB")
    image = image[..., :3]
    return _to_uint8(image)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 as is; bool -> 0/255; uint16/int16 scaled by 255/65535; wider integers read as 8-bit
    values when <= 255, 16-bit when <= 65535, else scaled by their max; floats in [0, 1] scaled by
    255, other floats clipped to [0, 255]."""
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    x = image.astype(np.float64)
    if image.dtype.kind in "ui":
        top = float(np.max(x, initial=0))
        if image.dtype.itemsize == 2 or 255 < top <= 65535:
            x = x * (255.0 / 65535.0)
        elif top > 65535:
            x = x * (255.0 / top)
    elif np.nanmax(x, initial=0) <= 1.0:
        x = x * 255.0
    return np.clip(np.round(np.nan_to_num(x)), 0, 255).astype(np.uint8)


def _open_image(path: str | Path, upright: bool = True) -> Image.Image:
    """Open and fully decode an image file, raising ImageReadError with a one-line reason.

    With ``upright`` the EXIF orientation is applied (photos); without it the stored pixel grid is
    returned as is (masks, see :func:`read_mask`).
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file not found")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory, not an image")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: file is empty (0 bytes)")
    try:
        with Image.open(p) as img:
            img.load()
            return _upright(img, p) if upright else img.copy()
    except UnidentifiedImageError:
        raise ImageReadError(f"{p}: not a recognised image file") from None
    except PermissionError:
        raise ImageReadError(f"{p}: permission denied") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{p}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ImageReadError(f"{p}: cannot decode image (truncated or corrupt: {msg})") from None


def _upright(img: Image.Image, path: Path) -> Image.Image:
    """A decoded, file-independent copy of img with its EXIF orientation applied."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # broken EXIF must not hide a readable image
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, e)
        return img.copy()


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Pillow image in any mode -> uint8 [H, W, 3]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return to_rgb(_wide_array(img))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return to_rgb(np.asarray(img.convert("RGB")))


def _wide_array(img: Image.Image) -> np.ndarray:
    """16/32-bit integer or float grey image -> numpy array of its values (16-bit stays uint16)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return arr.astype(np.uint16)
    if img.mode == "I" and 0 <= arr.min(initial=0) and arr.max(initial=0) <= 65535:
        return arr.astype(np.uint16)
    return arr


def read_image(path: str | Path, upright: bool = True) -> np.ndarray:
    """Read an image file -> uint8 [H, W, 3] RGB (gray/RGBA/P/CMYK/16-bit ok).

    With ``upright`` (the default: photos, prediction) a JPEG's EXIF orientation is applied, so the
    array is the image as viewers display it; without it the pixels come as stored in the file
    (what ``skimage.io.imread`` returns, and the grid of annotations made on the stored pixels).
    Raises ImageReadError for missing, empty, truncated or non-image files.
    """
    img = _open_image(path, upright=upright)
    try:
        return _pil_to_rgb(img)
    except (OSError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot convert image mode {img.mode} to RGB ({e})") from None


#: The one mask rule (training, prediction, scoring): a pixel is lesion when its value is above
#: 128/255 of the mask's full scale, i.e. > 128 in an 8-bit mask (the official ISIC scorer's rule,
#: ``isic-challenge-scoring``), > 0 in a 0/1 label mask (maximum 1) and > 128 * 257 = 32896 in a
#: 16-bit mask with values above 255. The full scale is 1, 255 or 65535, whichever the values fit.
MASK_THRESHOLD_8BIT = 128


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file -> bool [H, W] (lesion = True), by :func:`binarize_mask`'s one rule.

    The mask is taken as stored: an EXIF orientation tag in a mask file is ignored, because ISIC
    masks are drawn in the displayed orientation of their image (whose EXIF rotation
    :func:`read_image` applies), so image and mask stay aligned. A colour mask whose channels are
    all equal is grey; any other colour mask (e.g. a red lesion drawn on black) is lesion where ANY
    channel is > 128; alpha is ignored. :func:`read_mask_and_colour` also says whether it was colour.
    """
    return read_mask_and_colour(path)[0]


def read_mask_and_colour(path: str | Path) -> tuple[np.ndarray, str | None]:
    """(:func:`read_mask`'s bool [H, W], the file's Pillow mode such as "RGB" when it is a colour
    mask whose channels differ, else None). Scoring reports colour masks: the official scorer
    accepts only single-channel masks."""
    img = _open_image(path, upright=False)
    if img.mode in ("1", "L"):
        return binarize_mask(np.asarray(img.convert("L"))), None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return binarize_mask(np.asarray(img)), None
    try:
        rgb = _pil_to_rgb(img)  # palette, alpha (dropped), CMYK, ... -> uint8 [H, W, 3]
    except (OSError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot convert mask mode {img.mode} to RGB ({e})") from None
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return binarize_mask(rgb[..., 0]), None
    return binarize_mask(rgb).any(axis=-1), img.mode


def binarize_mask(values: np.ndarray) -> np.ndarray:
    """Mask values (any shape) -> bool, elementwise: value > 128/255 of the full scale (1, 255 or
    65535, the smallest that holds the values): > 128 for 8-bit masks, > 0 for 0/1 label masks,
    > 32896 for 16-bit masks (see :data:`MASK_THRESHOLD_8BIT`)."""
    values = np.asarray(values)
    top = float(np.max(values, initial=0))
    scale = 1.0 if top <= 1 else 255.0 if top <= 255 else 65535.0
    return values > scale * MASK_THRESHOLD_8BIT / 255.0
