"""Synthetic dermoscopy images with lesion masks, and an ISIC 2018 Task 1 folder writer.

The images imitate what makes real dermoscopy hard: lesions darker than the surrounding skin
with irregular, fuzzy borders and colour variegation, on several skin tones, plus dark
distractors (hairs crossing the lesion, ruler or ink marks, the black corners of the
dermoscope's circular field) so that a global intensity threshold does not solve the task.

Everything is drawn with OpenCV on float32 arrays and is deterministic given the
``numpy.random.Generator`` passed in. Images are RGB uint8 ``[H, W, 3]``; masks are bool
``[H, W, N]`` with one channel per lesion (N is 1, rarely 2).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from mrcnn.fileio import write_bytes_atomic

#: ISIC 2018 Task 1 folder names (training split).
INPUT_DIR = "ISIC2018_Task1-2_Training_Input"
GROUND_TRUTH_DIR = "ISIC2018_Task1_Training_GroundTruth"

#: Skin base colours (RGB), light to dark.
SKIN_TONES = np.array(
    [
        [238, 205, 188],
        [226, 178, 150],
        [205, 150, 118],
        [178, 126, 92],
        [138, 92, 66],
        [98, 64, 46],
    ],
    dtype=np.float32,
)

#: Pigment tints (multipliers on the skin colour) for the lesion body.
BROWN_TINT = np.array([0.95, 0.78, 0.66], dtype=np.float32)
BLACK = np.array([28, 22, 22], dtype=np.float32)
BLUE_GREY = np.array([0.62, 0.66, 0.80], dtype=np.float32)

SECOND_LESION_PROB = 0.08


def image_id(index: int) -> str:
    """ISIC-style id for an integer index: ``ISIC_0000042``."""
    return f"ISIC_{index:07d}"


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int,
                  fine: int = 0, fine_weight: float = 0.5) -> np.ndarray:
    """Zero-mean smooth noise [H, W] float32: a cells x cells Gaussian grid upsampled (unit variance).

    With ``fine`` > 0 a second, finer octave (fine x fine grid, weight ``fine_weight``) is added
    at grid level, so the full-size resize happens only once.
    """
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    if fine > cells:
        grid = cv2.resize(grid, (fine, fine), interpolation=cv2.INTER_CUBIC)
        grid += fine_weight * rng.standard_normal((fine, fine), dtype=np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _contour(rng: np.random.Generator, center: tuple[float, float], radius: float) -> np.ndarray:
    """Irregular closed contour [K, 2] as (x, y) points: a rotated ellipse with a Fourier-perturbed radius."""
    theta = np.linspace(0.0, 2.0 * np.pi, 160, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 9):
        r += rng.normal(0.0, 0.16 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.45, 1.8)
    aspect = rng.uniform(0.7, 1.0)
    angle = rng.uniform(0, np.pi)
    x, y = r * np.cos(theta), aspect * r * np.sin(theta)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    pts = np.stack([center[1] + cos_a * x - sin_a * y, center[0] + sin_a * x + cos_a * y], axis=1)
    return pts


def _fill(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a polygon of (x, y) points into a bool mask [H, W] (sub-pixel vertices)."""
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _lesion_shape(rng: np.random.Generator, height: int, width: int, center: tuple[float, float],
                  radius: float) -> np.ndarray:
    """One lesion mask [H, W] bool with an irregular border."""
    return _fill(_contour(rng, center, radius), height, width)


def _skin(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured skin [H, W, 3] float32 in 0..255 and its base colour [3]."""
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    shade = 1.0 + 0.05 * _smooth_noise(rng, height, width, 4, 16, 0.5)
    skin = tone[None, None, :] * shade[..., None]
    return skin, tone


def _lesion_colour(rng: np.random.Generator, tone: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Variegated lesion colour [H, W, 3] float32: brown body with dark, black and blue-grey blotches."""
    height, width = mask.shape
    base = tone * BROWN_TINT * rng.uniform(0.38, 0.68)
    texture = 1.0 + 0.12 * _smooth_noise(rng, height, width, 10, 32, 0.5)
    colour = base[None, None, :] * texture[..., None]
    ys, xs = np.nonzero(mask)
    size = np.sqrt(mask.sum())
    lum = float(tone.mean()) / 180.0
    choices = [tone * BROWN_TINT * 0.28, BLACK, tone.mean() * 0.75 * BLUE_GREY * min(1.0, lum + 0.2)]
    for _ in range(rng.integers(1, 6)):
        i = rng.integers(len(ys))
        kind = rng.choice(3, p=[0.5, 0.25, 0.25])
        axes = (max(1, int(size * rng.uniform(0.06, 0.25))), max(1, int(size * rng.uniform(0.06, 0.25))))
        sigma = 0.3 * max(axes)
        reach = int(max(axes) + 3 * sigma) + 1
        y0, y1 = max(0, ys[i] - reach), min(height, ys[i] + reach + 1)
        x0, x1 = max(0, xs[i] - reach), min(width, xs[i] + reach + 1)
        blob = np.zeros((y1 - y0, x1 - x0), np.float32)
        cv2.ellipse(blob, (int(xs[i] - x0), int(ys[i] - y0)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
        blob = cv2.GaussianBlur(blob, (0, 0), sigma) * rng.uniform(0.5, 0.9)
        patch = colour[y0:y1, x0:x1]
        patch += blob[..., None] * (choices[kind][None, None, :] - patch)
    return colour


def _blend_lesion(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, tone: np.ndarray) -> None:
    """Blend a lesion into ``image`` [H, W, 3] in place through a fuzzy alpha around ``mask`` [H, W].

    Work happens in the mask's bounding box (y1, x1, y2, x2) grown by three blur sigmas.
    """
    height, width = mask.shape
    size = np.sqrt(mask.sum())
    sigma = max(0.8, size * rng.uniform(0.01, 0.06))
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    grow = int(3 * sigma) + 2
    y1, y2 = max(0, rows[0] - grow), min(height, rows[-1] + grow + 1)
    x1, x2 = max(0, cols[0] - grow), min(width, cols[-1] + grow + 1)
    sub = mask[y1:y2, x1:x2]
    alpha = cv2.GaussianBlur(sub.astype(np.float32), (0, 0), sigma)
    fade = 1.0 - 0.25 * np.clip(_smooth_noise(rng, *sub.shape, 6), 0, None)
    alpha = np.clip(alpha * fade * rng.uniform(0.85, 1.0), 0.0, 1.0)
    colour = _lesion_colour(rng, tone, sub)
    patch = image[y1:y2, x1:x2]
    patch += alpha[..., None] * (colour - patch)


def _line_scale(height: int, width: int) -> int:
    """Line thickness multiplier: 1 up to ~384 px, then growing with the image size."""
    return max(1, round(min(height, width) / 256))


def _hairs(rng: np.random.Generator, image: np.ndarray) -> None:
    """Draw 0..30 dark curved hairs (quadratic Bezier curves) on ``image`` [H, W, 3] in place."""
    height, width = image.shape[:2]
    count = 0 if rng.random() < 0.5 else int(rng.choice([rng.integers(1, 6), rng.integers(5, 30)]))
    t = np.linspace(0.0, 1.0, 24)[:, None]
    colour = tuple(float(c) for c in rng.uniform(10, 55) * np.array([1.0, 0.85, 0.75]))
    for _ in range(count):
        p0 = rng.uniform([0, 0], [width, height])
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-6
        length = rng.uniform(0.2, 0.9) * max(height, width)
        p2 = p0 + direction * length
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * length, 2)
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        thickness = (1 if rng.random() < 0.7 else 2) * _line_scale(height, width)
        cv2.polylines(image, [np.round(curve * 16).astype(np.int32)], False, colour, thickness, cv2.LINE_AA, 4)


def _ruler(rng: np.random.Generator, image: np.ndarray) -> None:
    """Draw a ruler (a line with tick marks) along one image edge of ``image`` in place."""
    height, width = image.shape[:2]
    colour = (float(rng.uniform(15, 60)),) * 3
    line = _line_scale(height, width)
    offset = int(rng.uniform(0.04, 0.12) * min(height, width))
    step = max(3, int(rng.uniform(0.025, 0.045) * min(height, width)))
    tick = max(2, step)
    if rng.random() < 0.5:  # horizontal, top or bottom
        y = offset if rng.random() < 0.5 else height - 1 - offset
        cv2.line(image, (0, y), (width - 1, y), colour, line, cv2.LINE_AA)
        for i, x in enumerate(range(0, width, step)):
            cv2.line(image, (x, y), (x, y + (tick * 2 if i % 5 == 0 else tick)), colour, line, cv2.LINE_AA)
    else:  # vertical, left or right
        x = offset if rng.random() < 0.5 else width - 1 - offset
        cv2.line(image, (x, 0), (x, height - 1), colour, line, cv2.LINE_AA)
        for i, y in enumerate(range(0, height, step)):
            cv2.line(image, (x, y), (x + (tick * 2 if i % 5 == 0 else tick), y), colour, line, cv2.LINE_AA)


def _ink(rng: np.random.Generator, image: np.ndarray) -> None:
    """Draw purple surgical-ink dots or arcs on ``image`` in place."""
    height, width = image.shape[:2]
    colour = tuple(float(c) for c in rng.uniform(0.6, 1.2) * np.array([85, 45, 110]))
    for _ in range(rng.integers(1, 5)):
        cx, cy = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        radius = int(rng.uniform(0.01, 0.08) * min(height, width)) + 1
        if rng.random() < 0.5:
            cv2.circle(image, (cx, cy), radius, colour, -1, cv2.LINE_AA)
        else:
            start = rng.uniform(0, 360)
            cv2.ellipse(image, (cx, cy), (radius * 3, radius * 2), 0, start, start + rng.uniform(60, 200),
                        colour, int(rng.integers(1, 4)), cv2.LINE_AA)


def _specular(rng: np.random.Generator, image: np.ndarray) -> None:
    """Add a few small bright reflections (air bubbles) to ``image`` in place."""
    height, width = image.shape[:2]
    for _ in range(rng.integers(1, 4)):
        centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        radius = int(rng.uniform(0.005, 0.02) * min(height, width)) + 1
        cv2.circle(image, centre, radius, (235.0, 235.0, 235.0), -1, cv2.LINE_AA)


def _vignette(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Darken towards the corners; often a black circular dermoscope field. Returns the new image."""
    height, width = image.shape[:2]
    cy = height / 2 + rng.normal(0, 0.03 * height)
    cx = width / 2 + rng.normal(0, 0.03 * width)
    half = np.sqrt(height * width) / 2  # circular field, also on non-square images
    yy = ((np.arange(height, dtype=np.float32) - cy) / half)[:, None]
    xx = ((np.arange(width, dtype=np.float32) - cx) / half)[None, :]
    dist = np.sqrt(yy**2 + xx**2)
    gain = 1.0 - rng.uniform(0.05, 0.25) * np.clip(dist, 0, 1.5) ** 2
    if rng.random() < 0.55:
        radius = rng.uniform(1.0, 1.35)
        soft = rng.uniform(0.02, 0.08)
        field = np.clip((radius - dist) / soft, 0.0, 1.0)
        floor = rng.uniform(0.0, 0.12)
        gain = gain * (floor + (1 - floor) * field)
    return image * gain[..., None]


def _place(rng: np.random.Generator, height: int, width: int) -> tuple[tuple[float, float], float]:
    """Centre (y, x) and radius of the main lesion."""
    side = min(height, width)
    center = (height / 2 + rng.normal(0, 0.07 * height), width / 2 + rng.normal(0, 0.07 * width))
    return center, side * rng.uniform(0.12, 0.34)


def _second_lesion(rng: np.random.Generator, first: np.ndarray) -> np.ndarray | None:
    """A small lesion [H, W] bool that does not touch ``first``, or None if none fits."""
    height, width = first.shape
    side = min(height, width)
    grown = cv2.dilate(first.astype(np.uint8), np.ones((5, 5), np.uint8), iterations=2).astype(bool)
    for _ in range(6):
        radius = side * rng.uniform(0.05, 0.1)
        center = (rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width)
        mask = _lesion_shape(rng, height, width, center, radius)
        if mask.any() and not (mask & grown).any():
            return mask
    return None


def make_lesion_image(rng: np.random.Generator, height: int = 256, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic dermoscopy image and its lesion masks.

    Returns ``(image, masks)``: image uint8 [H, W, 3] RGB, masks bool [H, W, N] (N >= 1, one
    channel per lesion, every channel non-empty, instances do not overlap).
    """
    image, tone = _skin(rng, height, width)
    center, radius = _place(rng, height, width)
    masks = [_lesion_shape(rng, height, width, center, radius)]
    if not masks[0].any():  # degenerate tiny image: fall back to a central disc
        masks[0] = _fill(_contour(rng, (height / 2, width / 2), max(2.0, min(height, width) / 4)), height, width)
    if rng.random() < SECOND_LESION_PROB:
        extra = _second_lesion(rng, masks[0])
        if extra is not None:
            masks.append(extra)
    for mask in masks:
        _blend_lesion(rng, image, mask, tone)
    _hairs(rng, image)
    if rng.random() < 0.15:
        _ruler(rng, image)
    if rng.random() < 0.15:
        _ink(rng, image)
    if rng.random() < 0.15:
        _specular(rng, image)
    image = _vignette(rng, image)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    image += (rng.random((height, width, 1), dtype=np.float32) - 0.5) * 7.0  # sensor noise, std 2
    return np.clip(image, 0, 255).astype(np.uint8), np.stack(masks, axis=-1)


def encode_pair(image: np.ndarray, masks: np.ndarray) -> tuple[bytes, bytes]:
    """JPEG bytes of an RGB image [H, W, 3] and PNG bytes of the 0/255 union of masks [H, W, N]."""
    ok_jpg, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    union = np.where(masks.any(axis=-1), 255, 0).astype(np.uint8)
    ok_png, png = cv2.imencode(".png", union)
    if not (ok_jpg and ok_png):
        raise RuntimeError("OpenCV failed to encode a synthetic image")
    return jpg.tobytes(), png.tobytes()


def write_isic_dataset(root: str | os.PathLike, n_images: int, seed: int = 0,
                       size: tuple[int, int] = (256, 256)) -> list[str]:
    """Write ``n_images`` synthetic images in the ISIC 2018 Task 1 training layout under ``root``.

    ``root/ISIC2018_Task1-2_Training_Input/ISIC_XXXXXXX.jpg`` (RGB JPEG) and
    ``root/ISIC2018_Task1_Training_GroundTruth/ISIC_XXXXXXX_segmentation.png`` (single channel,
    0/255 union of the lesions). Image ``i`` depends only on ``(seed, i)`` and ``size``, so the
    same seed always gives identical bytes. ``size`` is (height, width). Returns the ids.
    """
    root = Path(root)
    image_dir, truth_dir = root / INPUT_DIR, root / GROUND_TRUTH_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(n_images):
        rng = np.random.default_rng([seed, index])
        image, masks = make_lesion_image(rng, size[0], size[1])
        jpg, png = encode_pair(image, masks)
        ids.append(image_id(index))
        write_bytes_atomic(image_dir / f"{ids[-1]}.jpg", jpg)
        write_bytes_atomic(truth_dir / f"{ids[-1]}_segmentation.png", png)
    return ids


def add_artefacts(rng: np.random.Generator, image: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """A copy of a real or synthetic RGB uint8 image [H, W, 3] with the generator's acquisition
    artefacts drawn on it: any of ``"hairs"``, ``"ruler"``, ``"ink"``, ``"specular"``,
    ``"vignette"`` (in that order). Used to build distribution-shift checks from real images."""
    out = image.astype(np.float32)
    drawers = {"hairs": _hairs, "ruler": _ruler, "ink": _ink, "specular": _specular}
    unknown = set(kinds) - set(drawers) - {"vignette"}
    if unknown:
        raise ValueError(f"unknown artefact(s) {sorted(unknown)}; known: {sorted(drawers) + ['vignette']}")
    for kind, draw in drawers.items():
        if kind in kinds:
            draw(rng, out)
    if "vignette" in kinds:
        out = _vignette(rng, out)
    return np.clip(out, 0, 255).astype(np.uint8)
