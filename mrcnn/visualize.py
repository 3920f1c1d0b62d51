"""Drawing and plotting: Matterport's ``visualize`` API plus file-writing helpers for the CLI.

Importable without a screen and without IPython: matplotlib's non-interactive "Agg" backend is
selected unless a backend was already chosen (``MPLBACKEND``, ``matplotlib.use`` or an earlier
pyplot import, e.g. a notebook's inline backend). The ``display_*`` functions show the figure on
an interactive backend; every one of them also takes ``save_path`` to write a PNG instead.

Images are RGB uint8 [H, W, 3]; masks bool [H, W, N]; boxes (y1, x1, y2, x2) pixels with y2/x2
exclusive. Every file is written atomically (:mod:`mrcnn.fileio`).
"""

from __future__ import annotations

import colorsys
import csv
import math
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib


def _backend_chosen() -> bool:
    """Whether a matplotlib backend was already chosen (without triggering automatic selection)."""
    if "matplotlib.pyplot" in sys.modules or os.environ.get("MPLBACKEND"):
        return True
    try:
        return matplotlib.get_backend(auto_select=False) is not None
    except TypeError:  # matplotlib < 3.10
        return matplotlib.rcParams._get_backend_or_none() is not None


if not _backend_chosen():
    matplotlib.use("Agg")

import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import lines, patches  # noqa: E402

from mrcnn.fileio import atomic_path, write_bytes_atomic  # noqa: E402
from mrcnn.imaging import binarize_mask  # noqa: E402

LOSS_COLUMNS = ("loss", "rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss", "mrcnn_mask_loss")
_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "cairo", "pgf", "template"}


# --------------------------------------------------------------------------------------------
# Files and figures
# --------------------------------------------------------------------------------------------

def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, PNG by default) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=(path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB [H, W, 3] or grey [H, W] uint8 image as PNG, atomically."""
    path = Path(path)
    array = np.asarray(image)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path.name}")
    return write_bytes_atomic(path, data.tobytes())


def _finish(fig: Any, save_path: str | os.PathLike | None, show: bool = True) -> None:
    """Save (and close) the figure when ``save_path`` is given, else show it on a GUI backend."""
    if save_path is not None:
        save_figure(fig, save_path)
    elif show and plt.get_backend().lower() not in _NON_INTERACTIVE:
        plt.show()


# --------------------------------------------------------------------------------------------
# Matterport API
# --------------------------------------------------------------------------------------------

def display_images(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, cols: int = 4,
                   cmap: Any = None, norm: Any = None, interpolation: str | None = None,
                   save_path: str | os.PathLike | None = None) -> None:
    """Show images in a grid of ``cols`` columns (each cast to uint8), with optional titles."""
    titles = list(titles) if titles is not None else [""] * len(images)
    rows = max(1, math.ceil(len(images) / cols))
    fig = plt.figure(figsize=(14, 14 * rows / cols))
    for i, (image, title) in enumerate(zip(images, titles, strict=False), start=1):
        ax = fig.add_subplot(rows, cols, i)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        ax.imshow(np.asarray(image).astype(np.uint8), cmap=cmap, norm=norm, interpolation=interpolation)
    _finish(fig, save_path)


def random_colors(N: int, bright: bool = True) -> list[tuple[float, float, float]]:  # noqa: N803
    """N distinct RGB colours in [0, 1] (evenly spaced hues), shuffled with Python's ``random``."""
    value = 1.0 if bright else 0.7
    colors = [colorsys.hsv_to_rgb(i / N, 1.0, value) for i in range(N)]
    random.shuffle(colors)
    return colors


def apply_mask(image: np.ndarray, mask: np.ndarray, color: Sequence[float], alpha: float = 0.5) -> np.ndarray:
    """Blend ``color`` (RGB in [0, 1]) into ``image`` [H, W, 3] where ``mask`` [H, W] == 1; in place, returned."""
    for c in range(3):
        channel = image[:, :, c]
        image[:, :, c] = np.where(mask == 1, channel * (1 - alpha) + alpha * color[c] * 255, channel)
    return image


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer and hole outlines of a bool mask [H, W] as (x, y) float arrays [K, 2]."""
    padded = np.pad(mask.astype(np.uint8), 1)
    found, _ = cv2.findContours(padded, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1, 2).astype(np.float32) - 1 for c in found if len(c) > 2]


def _new_axis(ax: Any, figsize: tuple[float, float]) -> tuple[Any, bool]:
    if ax is not None:
        return ax, False
    _, ax = plt.subplots(1, figsize=figsize)
    return ax, True


def display_instances(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, class_ids: np.ndarray,
                      class_names: Sequence[str], scores: np.ndarray | None = None, title: str = "",
                      figsize: tuple[float, float] = (16, 16), ax: Any = None, show_mask: bool = True,
                      show_bbox: bool = True, colors: Sequence[Any] | None = None,
                      captions: Sequence[str] | None = None, save_path: str | os.PathLike | None = None) -> None:
    """Draw instances: dashed boxes [N, 4] (y1, x1, y2, x2), blended masks [H, W, N] with outlines, captions.

    Shows the figure when this function created the axis; with ``save_path`` saves it instead.
    """
    n = boxes.shape[0]
    if not n:
        print("\n*** No instances to display *** \n")
    else:
        assert boxes.shape[0] == masks.shape[-1] == class_ids.shape[0], "boxes, masks and class_ids disagree"
    ax, created = _new_axis(ax, figsize)
    colors = random_colors(n) if colors is None else colors
    height, width = image.shape[:2]
    ax.set_ylim(height + 10, -10)
    ax.set_xlim(-10, width + 10)
    ax.axis("off")
    ax.set_title(title)
    canvas = np.asarray(image).astype(np.uint32).copy()
    for i in range(n):
        color = colors[i]
        if not np.any(boxes[i]):
            continue  # padded detection
        y1, x1, y2, x2 = boxes[i]
        if show_bbox:
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=2, alpha=0.7,
                                           linestyle="dashed", edgecolor=color, facecolor="none"))
        caption = captions[i] if captions else _caption(class_ids[i], class_names, scores, i)
        ax.text(x1, y1 + 8, caption, color="w", size=11, backgroundcolor="none")
        mask = masks[:, :, i]
        if show_mask:
            canvas = apply_mask(canvas, mask, color)
        for outline in _contours(mask):
            ax.add_patch(patches.Polygon(outline, facecolor="none", edgecolor=color))
    ax.imshow(canvas.astype(np.uint8))
    if created or save_path is not None:
        _finish(ax.figure, save_path, show=created)


def _caption(class_id: int, class_names: Sequence[str], scores: np.ndarray | None, i: int) -> str:
    label = class_names[int(class_id)]
    return f"{label} {scores[i]:.3f}" if scores is not None else label


def display_differences(image: np.ndarray, gt_box: np.ndarray, gt_class_id: np.ndarray, gt_mask: np.ndarray,
                        pred_box: np.ndarray, pred_class_id: np.ndarray, pred_score: np.ndarray,
                        pred_mask: np.ndarray, class_names: Sequence[str], title: str = "", ax: Any = None,
                        show_mask: bool = True, show_box: bool = True, iou_threshold: float = 0.5,
                        score_threshold: float = 0.5, save_path: str | os.PathLike | None = None) -> None:
    """Ground truth in green, predictions in red captioned "score / IoU" (mask IoU with the matched GT)."""
    from mrcnn.ap import compute_matches

    order = np.argsort(pred_score)[::-1]
    pred_box, pred_class_id = pred_box[order], pred_class_id[order]
    pred_score, pred_mask = pred_score[order], pred_mask[..., order]
    gt_match, pred_match, overlaps = compute_matches(gt_box, gt_class_id, gt_mask, pred_box, pred_class_id,
                                                     pred_score, pred_mask, iou_threshold=iou_threshold,
                                                     score_threshold=score_threshold)
    n_gt, n_pred = len(gt_match), len(pred_match)
    colors = [(0, 1, 0, 0.8)] * n_gt + [(1, 0, 0, 1)] * n_pred
    captions = [""] * n_gt + [_difference_caption(pred_score[i], overlaps[i], pred_match[i]) for i in range(n_pred)]
    display_instances(image, np.concatenate([gt_box[:n_gt], pred_box[:n_pred]]),
                      np.concatenate([gt_mask[..., :n_gt], pred_mask[..., :n_pred]], axis=-1),
                      np.concatenate([gt_class_id[:n_gt], pred_class_id[:n_pred]]), class_names,
                      scores=np.concatenate([np.zeros(n_gt), pred_score[:n_pred]]), title=title, ax=ax,
                      show_mask=show_mask, show_bbox=show_box, colors=colors, captions=captions,
                      save_path=save_path)


def _difference_caption(score: float, ious: np.ndarray, match: float) -> str:
    iou = ious[int(match)] if match > -1 else (ious.max() if ious.size else 0.0)
    return f"{score:.2f} / {iou:.2f}"


def _paste(mask: np.ndarray, box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """Resize a small float mask [h, w] into box (y1, x1, y2, x2) of a bool image [H, W] (threshold 0.5)."""
    out = np.zeros(shape, bool)
    y1, x1, y2, x2 = (int(round(float(v))) for v in box)
    y1, x1, y2, x2 = max(0, y1), max(0, x1), min(shape[0], y2), min(shape[1], x2)
    if y2 > y1 and x2 > x1:
        out[y1:y2, x1:x2] = cv2.resize(np.asarray(mask, np.float32), (x2 - x1, y2 - y1)) >= 0.5
    return out


def draw_rois(image: np.ndarray, rois: np.ndarray, refined_rois: np.ndarray, mask: np.ndarray,
              class_ids: np.ndarray, class_names: Sequence[str], limit: int = 10,
              save_path: str | os.PathLike | None = None) -> None:
    """Show up to ``limit`` positive ROIs [N, 4] (dotted), their refined boxes (solid) and masks.

    mask: [N, h, w] or [N, h, w, num_classes] (the ROI's class channel is used), pasted into the
    refined box.
    """
    positive = np.where(class_ids > 0)[0]
    chosen = np.random.choice(positive, min(limit, len(positive)), replace=False) if len(positive) else positive
    fig, ax = plt.subplots(1, figsize=(12, 12))
    colors = random_colors(max(1, len(chosen)))
    canvas = np.asarray(image).astype(np.uint32).copy()
    for color, i in zip(colors, chosen, strict=False):
        y1, x1, y2, x2 = rois[i]
        ry1, rx1, ry2, rx2 = refined_rois[i]
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=2, edgecolor=color,
                                       facecolor="none", linestyle="dotted"))
        ax.add_patch(patches.Rectangle((rx1, ry1), rx2 - rx1, ry2 - ry1, linewidth=2, edgecolor=color,
                                       facecolor="none"))
        ax.add_line(lines.Line2D([x1, rx1], [y1, ry1], color=color))
        ax.text(rx1, ry1 + 8, class_names[int(class_ids[i])], color="w", size=11)
        roi_mask = mask[i][..., int(class_ids[i])] if mask[i].ndim == 3 else mask[i]
        canvas = apply_mask(canvas, _paste(roi_mask, refined_rois[i], canvas.shape[:2]), color)
    ax.imshow(canvas.astype(np.uint8))
    ax.set_title(f"Positive ROIs: {len(positive)}, negative ROIs: {int(np.sum(class_ids == 0))}")
    ax.axis("off")
    _finish(fig, save_path)


def draw_box(image: np.ndarray, box: Sequence[int], color: Sequence[int]) -> np.ndarray:
    """Burn a 2-pixel box (y1, x1, y2, x2) of ``color`` into ``image`` [H, W, 3]; in place, returned."""
    y1, x1, y2, x2 = (int(v) for v in box)
    image[y1:y1 + 2, x1:x2] = color
    image[y2:y2 + 2, x1:x2 + 2] = color
    image[y1:y2, x1:x1 + 2] = color
    image[y1:y2, x2:x2 + 2] = color
    return image


def display_top_masks(image: np.ndarray, mask: np.ndarray, class_ids: np.ndarray, class_names: Sequence[str],
                      limit: int = 4, save_path: str | os.PathLike | None = None) -> None:
    """The image and the union masks of the ``limit`` classes with the largest total area."""
    shown, titles = [image], [f"H x W={image.shape[0]}x{image.shape[1]}"]
    area = {int(c): int(np.sum(mask[:, :, class_ids == c])) for c in np.unique(class_ids)}
    top = [c for c in sorted(area, key=lambda c: -area[c]) if area[c] > 0]
    for i in range(limit):
        if i < len(top):
            picked = np.where(class_ids == top[i])[0]
            shown.append(np.sum(mask[:, :, picked] * np.arange(1, len(picked) + 1), axis=-1))
            titles.append(class_names[int(top[i])])
        else:
            shown.append(np.zeros(mask.shape[:2]))
            titles.append("-")
    display_images(shown, titles=titles, cols=limit + 1, cmap="Blues_r", save_path=save_path)


def plot_precision_recall(AP: float, precisions: np.ndarray, recalls: np.ndarray,  # noqa: N803
                          save_path: str | os.PathLike | None = None) -> None:
    """Precision against recall, titled with the AP at IoU 0.5."""
    fig, ax = plt.subplots(1)
    ax.set_title(f"Precision-Recall Curve. AP@50 = {AP:.3f}")
    ax.set_ylim(0, 1.1)
    ax.set_xlim(0, 1.1)
    ax.plot(recalls, precisions)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    _finish(fig, save_path)


def plot_overlaps(gt_class_ids: np.ndarray, pred_class_ids: np.ndarray, pred_scores: np.ndarray,
                  overlaps: np.ndarray, class_names: Sequence[str], threshold: float = 0.5,
                  save_path: str | os.PathLike | None = None) -> None:
    """Grid of IoUs [P, G] between predictions (rows, with scores) and ground truth (columns).

    A cell reads "match" (IoU >= threshold, same class), "wrong" (IoU >= threshold, other class)
    or is blank, plus the IoU value.
    """
    gt_class_ids, pred_class_ids = gt_class_ids[gt_class_ids != 0], pred_class_ids[pred_class_ids != 0]
    fig = plt.figure(figsize=(12, 10))
    plt.imshow(overlaps, interpolation="nearest", cmap=plt.cm.Blues)
    plt.yticks(np.arange(len(pred_class_ids)),
               [f"{class_names[int(c)]} ({pred_scores[i]:.2f})" for i, c in enumerate(pred_class_ids)])
    plt.xticks(np.arange(len(gt_class_ids)), [class_names[int(c)] for c in gt_class_ids], rotation=90)
    limit = overlaps.max() if overlaps.size else 1.0
    for i in range(overlaps.shape[0]):
        for j in range(overlaps.shape[1]):
            iou = overlaps[i, j]
            label = ""
            if iou > threshold:
                label = "match" if pred_class_ids[i] == gt_class_ids[j] else "wrong"
            plt.text(j, i, f"{iou:.3f}\n{label}", ha="center", va="center", fontsize=9,
                     color="white" if iou > limit / 2 else "black")
    plt.tight_layout()
    plt.xlabel("Ground Truth")
    plt.ylabel("Predictions")
    _finish(fig, save_path)


def draw_boxes(image: np.ndarray, boxes: np.ndarray | None = None, refined_boxes: np.ndarray | None = None,
               masks: np.ndarray | None = None, captions: Sequence[str] | None = None,
               visibilities: Sequence[int] | None = None, title: str = "", ax: Any = None,
               save_path: str | os.PathLike | None = None) -> None:
    """Boxes [N, 4] (dotted grey when refined boxes are also given), refined boxes, masks [H, W, N], captions.

    ``visibilities`` per box: 0 skip, 1 faint, 2 full.
    """
    assert boxes is not None or refined_boxes is not None, "give boxes or refined_boxes"
    n = boxes.shape[0] if boxes is not None else refined_boxes.shape[0]
    ax, created = _new_axis(ax, (12, 12))
    colors = random_colors(max(1, n))
    margin = image.shape[0] // 10
    ax.set_ylim(image.shape[0] + margin, -margin)
    ax.set_xlim(-margin, image.shape[1] + margin)
    ax.axis("off")
    ax.set_title(title)
    canvas = np.asarray(image).astype(np.uint32).copy()
    for i in range(n):
        visibility = visibilities[i] if visibilities is not None else 1
        if visibility == 0:
            continue
        color, alpha = ((0.5, 0.5, 0.5), 0.4) if visibility == 1 else (colors[i], 1.0)
        if boxes is not None and np.any(boxes[i]):
            y1, x1, y2, x2 = boxes[i]
            dotted = refined_boxes is not None
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=2, alpha=alpha,
                                           linestyle="dotted" if dotted else "dashed",
                                           edgecolor="grey" if dotted else color, facecolor="none"))
        if refined_boxes is not None and visibility > 0:
            ry1, rx1, ry2, rx2 = refined_boxes[i].astype(np.int32)
            ax.add_patch(patches.Rectangle((rx1, ry1), rx2 - rx1, ry2 - ry1, linewidth=2,
                                           edgecolor=color, facecolor="none"))
            if boxes is not None:
                ax.add_line(lines.Line2D([boxes[i][1], rx1], [boxes[i][0], ry1], color=color))
        if captions is not None:
            y1, x1 = (refined_boxes if refined_boxes is not None else boxes)[i][:2]
            ax.text(x1, y1, captions[i], size=11, verticalalignment="top", color="w",
                    bbox={"facecolor": color, "alpha": 0.5, "pad": 2, "edgecolor": "none"})
        if masks is not None:
            canvas = apply_mask(canvas, masks[:, :, i], color)
            for outline in _contours(masks[:, :, i]):
                ax.add_patch(patches.Polygon(outline, facecolor="none", edgecolor=color))
    ax.imshow(canvas.astype(np.uint8))
    if created or save_path is not None:
        _finish(ax.figure, save_path, show=created)


def display_table(table: Sequence[Sequence[Any]]) -> str:
    """Print a table (rows of cells, first row the header) as aligned plain text; returns the text."""
    cells = [[str(c) for c in row] for row in table]
    if not cells:
        print("")
        return ""
    widths = [max(len(row[j]) for row in cells if j < len(row)) for j in range(max(len(r) for r in cells))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells)
    print(text)
    return text


def _layer_weights(layer: Any) -> list[tuple[str, np.ndarray]]:
    """(name, values) of a Keras layer's weights (Keras 3 ``path`` when present)."""
    out = []
    for weight in getattr(layer, "weights", []):
        name = getattr(weight, "path", None) or getattr(weight, "name", "?")
        out.append((name, np.asarray(weight)))
    return out


def display_weight_stats(model: Any) -> str:
    """Table of each trainable layer's weights: name, shape, min, max, std (odd values flagged)."""
    keras_model = getattr(model, "keras_model", model)
    layers = model.get_trainable_layers() if hasattr(model, "get_trainable_layers") else keras_model.layers
    table = [["WEIGHT NAME", "SHAPE", "MIN", "MAX", "STD"]]
    for layer in layers:
        for i, (name, values) in enumerate(_layer_weights(layer)):
            flag = ""
            if values.size and values.min() == values.max() and not (i == 1 and "conv" in layer.__class__.__name__.lower()):
                flag = "  *** dead?"
            if values.size and np.abs(values).max() > 1000:
                flag = "  *** overflow?"
            stats = (values.min(), values.max(), values.std()) if values.size else (0.0, 0.0, 0.0)
            table.append([name + flag, str(values.shape), *(f"{v:+9.4f}" for v in stats)])
    return display_table(table)


# --------------------------------------------------------------------------------------------
# Toolkit helpers (files for the CLI)
# --------------------------------------------------------------------------------------------

def save_instances(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, class_ids: np.ndarray,
                   class_names: Sequence[str], scores: np.ndarray | None, path: str | os.PathLike) -> Path:
    """display_instances drawn at the image's own pixel size and written to ``path`` (PNG, W x H pixels).

    Colours are fixed (green first), so the same input gives the same picture.
    """
    height, width = image.shape[:2]
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    palette = [colorsys.hsv_to_rgb((0.33 + i / max(1, boxes.shape[0])) % 1.0, 1.0, 1.0) for i in range(boxes.shape[0])]
    display_instances(image, boxes, masks, class_ids, class_names, scores, ax=ax, colors=palette)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    return save_figure(fig, path, dpi=100)


def draw_overlay(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray | None = None,
                 scores: np.ndarray | None = None, color: tuple[int, int, int] = (0, 255, 0),
                 box_color: tuple[int, int, int] = (255, 255, 0), caption: str | None = None) -> np.ndarray:
    """RGB uint8 copy of ``image`` [H, W, 3] with each lesion's outline, box and score drawn with OpenCV.

    masks: bool [H, W] (a union) or [H, W, N]; boxes [N, 4] (y1, x1, y2, x2); scores [N];
    ``caption`` (e.g. a diagnosis ``"mel 0.82"``): white text in the image's bottom-left corner.
    """
    out = _rgb(image).copy()
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[..., None]
    height, width = out.shape[:2]
    thickness = max(1, round(min(height, width) / 250))
    boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes).reshape(-1, 4).astype(int)
    for y1, x1, y2, x2 in boxes:
        cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), box_color, thickness, cv2.LINE_8)
    for i in range(masks.shape[-1]):  # outlines over the boxes
        found, _ = cv2.findContours(masks[..., i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, found, -1, color, thickness, cv2.LINE_8)
    for i, (y1, x1, _, _) in enumerate(boxes):
        if scores is not None and i < len(scores):
            _label(out, f"{float(scores[i]):.3f}", x1, y1, box_color)
    if caption:
        _label(out, caption, 2, height, (255, 255, 255))
    return out


def _rgb(image: np.ndarray) -> np.ndarray:
    """Contiguous RGB uint8 [H, W, 3] from a grey [H, W], RGB or RGBA image."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _label(image: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> None:
    """Text on a dark background just above (x, y), kept inside the image."""
    scale = max(0.4, min(image.shape[:2]) / 600)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x = int(np.clip(x, 0, max(0, image.shape[1] - w - 2)))
    y = int(np.clip(y - 3, h + 2, image.shape[0] - base))
    cv2.rectangle(image, (x, y - h - 2), (x + w + 2, y + base), (0, 0, 0), -1)
    cv2.putText(image, text, (x + 1, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def _read_log(csv_path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """Rows of a Keras CSVLogger file keyed by epoch (a later row for an epoch wins, e.g. after resume)."""
    by_epoch: dict[int, dict[str, float]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(float(row.get("epoch", "")))
            except ValueError:
                continue  # repeated header or broken line
            by_epoch[epoch] = {k: _to_float(v) for k, v in row.items() if k and k != "epoch"}
    return dict(sorted(by_epoch.items()))


def _to_float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def curve_points(log: dict[int, dict[str, float]], column: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one column of a training log read by ``_read_log`` (NaN where absent)."""
    epochs = np.array(list(log), dtype=int)
    return epochs, np.array([log[e].get(column, math.nan) for e in log], dtype=float)


def plot_training_curves(csv_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Total loss and the five Mask R-CNN losses, train (solid) and val_ (dashed), per epoch -> PNG (1200x700).

    Reads ``training.csv`` (columns epoch, loss, rpn_class_loss, ..., val_loss, val_...; its epoch
    column is 1-based, the number of the checkpoint written after that epoch) and draws each row at
    its epoch number. Raises ValueError when the file has no epoch rows.
    """
    log = _read_log(csv_path)
    if not log:
        raise ValueError(f"no epochs in {csv_path}")
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), dpi=100)
    for ax, name in zip(axes.ravel(), LOSS_COLUMNS, strict=True):
        for column, style in ((name, "-"), (f"val_{name}", "--")):
            epochs, values = curve_points(log, column)
            if np.isfinite(values).any():
                ax.plot(epochs, values, style, marker="o", markersize=3, label=column)
        ax.set_title("total loss" if name == "loss" else name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.95, wspace=0.25, hspace=0.35)
    return save_figure(fig, out_png, dpi=100)


def _as_mask(mask: np.ndarray | None) -> np.ndarray | None:
    """Bool [H, W] from a bool/0-255 mask [H, W] (:func:`mrcnn.imaging.binarize_mask`) or instance
    masks [H, W, N] (union)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.any(axis=-1)
    return binarize_mask(mask) if mask.dtype.kind in "ui" else mask.astype(bool)


def _grid_row(item: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]:
    """(image, truth, pred, title) from a 4-tuple or a mapping with those keys."""
    if isinstance(item, dict):
        return item["image"], item.get("truth"), item.get("pred"), str(item.get("title", ""))
    image, truth, pred, title = item
    return image, truth, pred, str(title)


def save_evaluation_grid(rows: Sequence[Any], out_png: str | os.PathLike, ncols: int = 3) -> Path:
    """One row per sample: image (titled), ground truth, prediction [, both outlines on the image].

    rows: ``(image [H, W, 3], truth [H, W] or [H, W, N], pred (same, or None), title)`` tuples or
    mappings with keys image/truth/pred/title. ``ncols`` is 3, or 4 to add an overlay panel with
    the truth outline in green and the prediction in red. PNG of 300*ncols x 300*len(rows) pixels.
    """
    if ncols not in (3, 4):
        raise ValueError("ncols must be 3 (image, truth, prediction) or 4 (+ overlay)")
    if not rows:
        raise ValueError("no rows to draw")
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3 * ncols, 3 * len(rows)), dpi=100, squeeze=False)
    for axis_row, item in zip(axes, rows, strict=True):
        image, truth, pred, title = _grid_row(item)
        truth, pred = _as_mask(truth), _as_mask(pred)
        image = _rgb(image)
        panels = [(image, title or "image"), (truth, "ground truth"), (pred, "prediction")]
        if ncols == 4:
            both = draw_overlay(image, truth if truth is not None else np.zeros(image.shape[:2], bool))
            if pred is not None:
                both = draw_overlay(both, pred, color=(255, 0, 0))
            panels.append((both, "truth (green) / prediction (red)"))
        for ax, (content, label) in zip(axis_row, panels, strict=True):
            ax.axis("off")
            ax.set_title(label, fontsize=8)
            if content is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            elif content.ndim == 2:
                ax.imshow(content, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(content)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.15)
    return save_figure(fig, out_png, dpi=100)


def save_confusion_matrix(counts: Sequence[Sequence[int]], class_names: Sequence[str],
                          out_png: str | os.PathLike) -> Path:
    """Confusion matrix picture: counts (left) and row-normalised shares (right), rows = truth,
    columns = prediction, both in ``class_names`` order; counts [K, K]. Written atomically."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    k = len(class_names)
    side = max(3.0, 0.6 * k + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.0, side), dpi=100)
    for ax, values, title, text in ((axes[0], counts, "counts", lambda v: f"{int(v)}"),
                                    (axes[1], shares, "share of each true class", lambda v: f"{v:.2f}")):
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        for (row, col), value in np.ndenumerate(values):
            ax.text(col, row, text(value), ha="center", va="center", fontsize=7,
                    color="white" if shares[row, col] > 0.5 else "black")
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=100)
