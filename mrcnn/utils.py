"""Matterport-compatible ``mrcnn.utils`` facade.

Re-exports the Dataset class and the numpy/TF helpers under Matterport's names; the
implementations live in ``mrcnn.dataset``, ``mrcnn.boxes``, ``mrcnn.imaging``, ``mrcnn.ap`` and
``mrcnn.tf_boxes``. Only ``batch_slice`` and ``download_trained_weights`` are defined here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from mrcnn.ap import compute_ap, compute_ap_range, compute_matches, compute_recall
from mrcnn.boxes import (
    apply_box_deltas,
    box_refinement,
    compute_backbone_shapes,
    compute_iou,
    compute_overlaps,
    compute_overlaps_masks,
    denorm_boxes,
    extract_bboxes,
    generate_anchors,
    generate_pyramid_anchors,
    non_max_suppression,
    norm_boxes,
    trim_zeros,
)
from mrcnn.dataset import Dataset
from mrcnn.downloads import COCO
from mrcnn.imaging import (
    ImageReadError,
    compose_image_meta,
    expand_mask,
    minimize_mask,
    mold_image,
    parse_image_meta,
    parse_image_meta_graph,
    read_image,
    read_mask,
    resize,
    resize_image,
    resize_mask,
    to_rgb,
    unmold_image,
    unmold_mask,
)
from mrcnn.tf_boxes import (
    apply_box_deltas_graph,
    box_refinement_graph,
    clip_boxes_graph,
    denorm_boxes_graph,
    norm_boxes_graph,
    overlaps_graph,
    trim_zeros_graph,
)

#: Where Matterport published the COCO-trained weights (release v2.0).
COCO_MODEL_URL = COCO.url

__all__ = [
    "COCO_MODEL_URL", "Dataset", "ImageReadError",
    "apply_box_deltas", "apply_box_deltas_graph", "batch_slice", "box_refinement", "box_refinement_graph",
    "clip_boxes_graph", "compose_image_meta", "compute_ap", "compute_ap_range", "compute_backbone_shapes",
    "compute_iou", "compute_matches", "compute_overlaps", "compute_overlaps_masks", "compute_recall",
    "denorm_boxes", "denorm_boxes_graph", "download_trained_weights", "expand_mask", "extract_bboxes",
    "generate_anchors", "generate_pyramid_anchors", "minimize_mask", "mold_image", "non_max_suppression",
    "norm_boxes", "norm_boxes_graph", "overlaps_graph", "parse_image_meta", "parse_image_meta_graph",
    "read_image", "read_mask", "resize", "resize_image", "resize_mask", "to_rgb", "trim_zeros",
    "trim_zeros_graph", "unmold_image", "unmold_mask",
]


def batch_slice(inputs: Any, graph_fn: Callable[..., Any], batch_size: int,
                names: Sequence[str] | None = None) -> Any:
    """Run graph_fn on each batch item of inputs (a tensor or list of [B, ...] tensors), stack results.

    graph_fn gets one slice per input and returns a tensor or a tuple/list of tensors; the
    outputs are stacked along a new axis 0 (named by ``names``). A single output is returned
    bare, several as a list.
    """
    if not isinstance(inputs, list):
        inputs = [inputs]
    per_item = []
    for i in range(batch_size):
        out = graph_fn(*[x[i] for x in inputs])
        per_item.append(list(out) if isinstance(out, (tuple, list)) else [out])
    grouped = list(zip(*per_item, strict=True))
    names = list(names) if names is not None else [None] * len(grouped)
    result = [tf.stack(list(o), axis=0, name=n) for o, n in zip(grouped, names, strict=False)]
    return result[0] if len(result) == 1 else result


def download_trained_weights(coco_model_path: str = "weights/mask_rcnn_coco.h5", verbose: int = 1) -> str:
    """Download Matterport's COCO weights to ``coco_model_path`` (Matterport's signature).

    Progress bar, checksum check and an atomic rename (:func:`mrcnn.downloads.fetch_weights`);
    raises :class:`mrcnn.downloads.DownloadError` (one line: URL and path) offline or on a bad file.
    """
    from mrcnn.downloads import COCO, fetch_weights

    return str(fetch_weights(COCO, coco_model_path, verbose=verbose))
