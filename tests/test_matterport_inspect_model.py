"""Matterport's inspect_model notebook, cells "Run Detection" to "Stage 3", on a tiny model.

The same functions and layer names the notebook drives, in its order: detect and AP, the
precision-recall and overlap plots, mAP over a batch; RPN targets on ``model.anchors`` and their
refinement; ``run_graph`` on the RPN and on the heads (``ROI``, ``mrcnn_class``, ``mrcnn_bbox``,
``mrcnn_mask``, ``mrcnn_detection``); step-by-step detection (argmax, class-specific deltas,
``apply_box_deltas``, per-class ``non_max_suppression``); the masks of the detections
(``mrcnn_mask[0, i, :, :, class]``, ``unmold_mask``). The weights are random (a shifted class
bias makes the tiny model find objects); the test is about the API answering the notebook, not
about what it finds. The notebook's ``model.ancestor(pillar, "ROI/pre_nms_anchors:0")`` finds
TensorFlow ops inside a layer, which Keras 3 does not record: it gives None (README, "Coming from
Matterport").
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from factories import make_config  # noqa: E402
from helpers import array_dataset, lesion_pairs  # noqa: E402

import mrcnn.model as modellib  # noqa: E402
from mrcnn import utils, visualize  # noqa: E402
from mrcnn.model import log  # noqa: E402


def get_ax(rows: int = 1, cols: int = 1, size: int = 4):
    """The notebook's helper: a matplotlib axis (grid) to draw into."""
    _, ax = plt.subplots(rows, cols, figsize=(size * cols, size * rows))
    return ax


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = make_config("small", DETECTION_MIN_CONFIDENCE=0.0)
    dataset = array_dataset(lesion_pairs(4, size=64, seed=3))
    model = modellib.MaskRCNN(mode="inference", config=config, model_dir=str(tmp_path_factory.mktemp("logs")))
    logits = model.keras_model.get_layer("mrcnn_class_logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel, bias + np.array([0.0, 8.0], np.float32)])  # random weights that find objects
    image_id = int(dataset.image_ids[0])
    gt = modellib.load_image_gt(dataset, config, image_id, use_mini_mask=False)
    yield config, dataset, model, gt
    plt.close("all")


def test_run_detection_and_precision_recall(setup):
    config, dataset, model, (image, image_meta, gt_class_id, gt_bbox, gt_mask) = setup
    results = model.detect([image], verbose=1)
    r = results[0]
    assert r["masks"].shape[:2] == image.shape[:2]
    AP, precisions, recalls, overlaps = utils.compute_ap(gt_bbox, gt_class_id, gt_mask, r["rois"], r["class_ids"],
                                                         r["scores"], r["masks"])
    visualize.plot_precision_recall(AP, precisions, recalls)
    visualize.plot_overlaps(gt_class_id, r["class_ids"], r["scores"], overlaps, dataset.class_names)
    APs = []
    for image_id in dataset.image_ids:
        image_i, _, class_i, bbox_i, mask_i = modellib.load_image_gt(dataset, config, image_id, use_mini_mask=False)
        r_i = model.detect([image_i], verbose=0)[0]
        APs.append(utils.compute_ap(bbox_i, class_i, mask_i, r_i["rois"], r_i["class_ids"], r_i["scores"],
                                    r_i["masks"])[0])
    assert len(APs) == 4 and all(0.0 <= ap <= 1.0 for ap in APs)


def test_stage1_rpn_targets_and_predictions(setup):
    config, dataset, model, (image, image_meta, gt_class_id, gt_bbox, gt_mask) = setup
    model.detect([image], verbose=0)  # sets model.anchors, as in the notebook
    target_rpn_match, target_rpn_bbox = modellib.build_rpn_targets(image.shape, model.anchors, gt_class_id, gt_bbox,
                                                                   model.config)
    log("target_rpn_match", target_rpn_match)
    positive_anchor_ix = np.where(target_rpn_match[:] == 1)[0]
    assert len(positive_anchor_ix) >= 1 and target_rpn_match.shape == (model.anchors.shape[0],)
    positive_anchors = model.anchors[positive_anchor_ix]
    refined_anchors = utils.apply_box_deltas(positive_anchors,
                                             target_rpn_bbox[:positive_anchors.shape[0]] * model.config.RPN_BBOX_STD_DEV)
    visualize.draw_boxes(image, boxes=positive_anchors, refined_boxes=refined_anchors, ax=get_ax())
    # the refined positive anchors land on the ground-truth boxes (the targets are exact deltas)
    assert utils.compute_overlaps(refined_anchors, gt_bbox.astype(np.float32)).max(axis=1).min() > 0.99

    pillar = model.keras_model.get_layer("ROI").output
    assert model.ancestor(pillar, "ROI/pre_nms_anchors:0") is None  # a TF op inside the layer: not in Keras 3
    rpn = model.run_graph([image], [
        ("rpn_class", model.keras_model.get_layer("rpn_class").output),
        ("proposals", model.keras_model.get_layer("ROI").output),
    ])
    limit = 20
    sorted_anchor_ids = np.argsort(rpn["rpn_class"][:, :, 1].flatten())[::-1]
    visualize.draw_boxes(image, boxes=model.anchors[sorted_anchor_ids[:limit]], ax=get_ax())
    h, w = config.IMAGE_SHAPE[:2]
    proposals = rpn["proposals"][0, :limit] * np.array([h, w, h, w])
    visualize.draw_boxes(image, refined_boxes=proposals, ax=get_ax())
    recall, positive_anchor_ids = utils.compute_recall(model.anchors, gt_bbox, 0.7)
    best_iou = utils.compute_overlaps(model.anchors, gt_bbox.astype(np.float32)).max(axis=0)
    assert recall == pytest.approx(float(np.mean(best_iou >= 0.7)))  # share of objects an anchor covers
    assert set(np.asarray(positive_anchor_ids).tolist()) <= set(range(model.anchors.shape[0]))


def test_stage2_and_stage3_step_by_step(setup):
    config, dataset, model, (image, image_meta, gt_class_id, gt_bbox, gt_mask) = setup
    mrcnn = model.run_graph([image], [
        ("proposals", model.keras_model.get_layer("ROI").output),
        ("probs", model.keras_model.get_layer("mrcnn_class").output),
        ("deltas", model.keras_model.get_layer("mrcnn_bbox").output),
        ("masks", model.keras_model.get_layer("mrcnn_mask").output),
        ("detections", model.keras_model.get_layer("mrcnn_detection").output),
    ])
    n_rois, n_classes = config.POST_NMS_ROIS_INFERENCE, config.NUM_CLASSES
    assert mrcnn["probs"].shape == (1, n_rois, n_classes) and mrcnn["deltas"].shape == (1, n_rois, n_classes, 4)
    assert mrcnn["masks"].shape == (1, config.DETECTION_MAX_INSTANCES, *config.MASK_SHAPE, n_classes)
    det_class_ids = mrcnn["detections"][0, :, 4].astype(np.int32)
    det_count = int(np.where(det_class_ids == 0)[0][0]) if (det_class_ids == 0).any() else len(det_class_ids)
    det_class_ids = det_class_ids[:det_count]
    assert det_count >= 1

    h, w = config.IMAGE_SHAPE[:2]
    proposals = np.around(mrcnn["proposals"][0] * np.array([h, w, h, w])).astype(np.int32)
    roi_class_ids = np.argmax(mrcnn["probs"][0], axis=1)
    roi_scores = mrcnn["probs"][0, np.arange(roi_class_ids.shape[0]), roi_class_ids]
    roi_bbox_specific = mrcnn["deltas"][0, np.arange(proposals.shape[0]), roi_class_ids]
    refined_proposals = utils.apply_box_deltas(proposals, roi_bbox_specific * config.BBOX_STD_DEV).astype(np.int32)
    keep = np.where(roi_class_ids > 0)[0]
    keep = np.intersect1d(keep, np.where(roi_scores >= config.DETECTION_MIN_CONFIDENCE)[0])
    nms_keep = []
    for class_id in np.unique(roi_class_ids[keep]):
        ixs = np.where(roi_class_ids[keep] == class_id)[0]
        class_keep = utils.non_max_suppression(refined_proposals[keep][ixs].astype(np.float32),
                                               roi_scores[keep][ixs], config.DETECTION_NMS_THRESHOLD)
        nms_keep = np.union1d(nms_keep, keep[ixs[class_keep]])
    keep = np.intersect1d(keep, nms_keep).astype(np.int32)
    assert len(keep) >= 1
    visualize.draw_boxes(image, boxes=proposals[keep], refined_boxes=refined_proposals[keep],
                         visibilities=np.where(roi_class_ids[keep] > 0, 1, 0), ax=get_ax())

    # Stage 3: the masks of the detections, one per detection at its class, pasted into the image
    det_boxes = (mrcnn["detections"][0, :det_count, :4] * np.array([h, w, h, w])).astype(np.int32)
    det_mask_specific = np.array([mrcnn["masks"][0, i, :, :, c] for i, c in enumerate(det_class_ids)])
    assert det_mask_specific.shape == (det_count, *config.MASK_SHAPE)
    assert 0.0 <= det_mask_specific.min() and det_mask_specific.max() <= 1.0 and det_mask_specific.any()
    det_masks = np.array([utils.unmold_mask(m, det_boxes[i], image.shape) for i, m in enumerate(det_mask_specific)])
    assert det_masks.shape == (det_count, *image.shape[:2]) and det_masks.dtype == bool
    visualize.display_images(det_mask_specific[:4] * 255, cmap="Blues", interpolation="none")
