"""Stage-by-stage parity with Matterport's outputs (matterport_reference_outputs.npz).

The COCO-config ResNet-101 inference model (NUM_CLASSES 81, 256x256) is built once, its weighted
layers are compared with the manifest, the deterministic rule weights are written into a
Keras-2-layout h5 with h5py and loaded through ``load_weights(by_name=True)``. Each stage is then
fed the *stored* Matterport inputs of that stage, so one near-tie cannot hide other bugs.
The largest difference of every stage is printed (run with ``-s`` to see the table).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import make_config
from matterport_h5 import load_manifest, shared_coco_rule_file

from mrcnn.model import MaskRCNN
from mrcnn.weights import weighted_layers

#: Stage -> Keras layer whose output Matterport stored under that key.
STAGE_LAYERS = {"C2": "res2c_out", "C3": "res3d_out", "C4": "res4w_out", "C5": "res5c_out",
                "P2": "fpn_p2", "P3": "fpn_p3", "P4": "fpn_p4", "P5": "fpn_p5", "P6": "fpn_p6",
                "rpn_class": "rpn_class", "rpn_bbox": "rpn_bbox", "rpn_rois": "ROI"}
RTOL, ATOL = 1e-4, 1e-3



def report(stage: str, value: float, note: str = "") -> None:
    print(f"\nPARITY {stage:32s} max diff {value:.3g} {note}")


@pytest.fixture(scope="module")
def ref(reference_dir):
    return dict(np.load(reference_dir / "matterport_reference_outputs.npz"))


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return load_manifest(reference_dir)


@pytest.fixture(scope="module")
def rule_file(reference_dir, tmp_path_factory):
    return shared_coco_rule_file(reference_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def coco(rule_file, tmp_path_factory):
    """(model, load report) with the rule weights loaded by name."""
    # The reference README's inference config.
    model = MaskRCNN("inference", make_config("coco", DETECTION_MIN_CONFIDENCE=0),
                     str(tmp_path_factory.mktemp("logs")))
    load_report = model.load_weights(str(rule_file[0]), by_name=True)
    return model, load_report


@pytest.fixture(scope="module")
def stages(coco, ref):
    """Our intermediate outputs on the reference image, keyed like the npz."""
    model, _ = coco
    km = model.keras_model
    return model.run_graph([ref["image"]], [(k, km.get_layer(v).output) for k, v in STAGE_LAYERS.items()])


def _sub_model(km: keras.Model, inputs: list[str], outputs: list[str]) -> keras.Model:
    """A model from intermediate layer outputs (to feed stored Matterport tensors to one stage)."""
    def tensor(name: str) -> keras.KerasTensor:
        return km.inputs[1] if name == "input_image_meta" else km.get_layer(name).output

    return keras.Model([tensor(n) for n in inputs],
                       [km.get_layer(n).output for n in outputs])


def _identical_rows(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> float:
    return float(np.mean(np.all(np.abs(a - b) <= atol, axis=-1)))


# ---------------------------------------------------------------------------------------------
# Weights


def test_weighted_layers_match_manifest(coco, manifest):
    model, _ = coco
    ours = {name: {w: tuple(v.shape) for w, v in entries} for name, entries in weighted_layers(model.keras_model).items()}
    theirs = {layer["name"]: {w["name"]: tuple(w["shape"]) for w in layer["weights"]} for layer in manifest["layers"]}
    assert set(ours) == set(theirs)
    assert ours == theirs
    # Keras-2 order inside each layer (what positional loaders such as Matterport's rely on).
    order = {name: [w for w, _ in entries] for name, entries in weighted_layers(model.keras_model).items()}
    assert order == {layer["name"]: [w["name"] for w in layer["weights"]] for layer in manifest["layers"]}
    assert sum(int(np.prod(s)) for layer in ours.values() for s in layer.values()) == manifest["totals"]["parameters"]


def test_rule_weights_loaded_by_name(coco, rule_file, manifest):
    model, load_report = coco
    assert len(load_report.loaded) == len(manifest["layers"]) == 233
    assert not load_report.skipped and not load_report.only_in_file and not load_report.only_in_model
    _, values = rule_file
    for name, entries in weighted_layers(model.keras_model).items():
        for weight_name, variable in entries:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), values[f"{name}/{weight_name}"])


# ---------------------------------------------------------------------------------------------
# Inputs


def test_anchors_exact(coco, ref):
    model, _ = coco
    anchors = model.get_anchors((256, 256, 3))
    assert anchors.shape == (16368, 4)
    np.testing.assert_allclose(anchors, ref["anchors"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.anchors, ref["anchors_pixels"], atol=1e-6, rtol=0)
    report("anchors", float(np.abs(anchors - ref["anchors"]).max()))


def test_molding_exact(coco, ref):
    model, _ = coco
    molded, metas, windows = model.mold_inputs([ref["image"]])
    np.testing.assert_allclose(molded, ref["molded_image"], atol=1.0 + 1e-4)
    np.testing.assert_allclose(metas, ref["image_meta"], rtol=1e-6)
    np.testing.assert_array_equal(windows, ref["window"])
    report("molded_image / image_meta", float(np.abs(molded - ref["molded_image"]).max()))


# ---------------------------------------------------------------------------------------------
# Backbone, FPN, RPN (end to end from the image)


@pytest.mark.parametrize("stage", ["C2", "C3", "C4", "C5", "P2", "P3", "P4", "P5", "P6", "rpn_class", "rpn_bbox"])
def test_feature_stages(stages, ref, stage):
    ours, theirs = stages[stage], ref[stage]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)
    report(stage, float(np.abs(ours - theirs).max()), f"(|ref| max {np.abs(theirs).max():.3g})")


def test_proposals_end_to_end(stages, ref):
    share = _identical_rows(stages["rpn_rois"][0], ref["rpn_rois"][0])
    report("rpn_rois (from image)", 1 - share, "= share of differing rows (score near-ties swap neighbours)")
    assert share >= 0.99
    # The differing rows are re-orderings: as a set the proposals agree.
    ours, theirs = stages["rpn_rois"][0], ref["rpn_rois"][0]
    np.testing.assert_allclose(ours[np.lexsort(ours.T[::-1])], theirs[np.lexsort(theirs.T[::-1])], atol=1e-5)


def test_proposal_layer_on_stored_inputs(coco, ref):
    model, _ = coco
    layer = model.keras_model.get_layer("ROI")
    proposals = layer([tf.constant(ref["rpn_class"]), tf.constant(ref["rpn_bbox"]),
                       tf.constant(ref["anchors"][np.newaxis])]).numpy()
    share = _identical_rows(proposals[0], ref["rpn_rois"][0], atol=1e-6)
    report("ProposalLayer (stored inputs)", float(np.abs(proposals - ref["rpn_rois"]).max()))
    assert share >= 0.99


# ---------------------------------------------------------------------------------------------
# Heads, detection layer, mask head (stored inputs)


def test_classifier_head_on_stored_inputs(coco, ref):
    model, _ = coco
    heads = _sub_model(model.keras_model, ["fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5", "ROI", "input_image_meta"],
                       ["roi_align_classifier", "mrcnn_class_logits_rois", "mrcnn_class", "mrcnn_bbox"])
    pooled, logits, probs, bbox = (keras.ops.convert_to_numpy(t) for t in heads(
        [ref["P2"], ref["P3"], ref["P4"], ref["P5"], ref["rpn_rois"], ref["image_meta"].astype(np.float32)]))
    for stage, ours, theirs in [("roi_align_classifier (first 32)", pooled[:, :32], ref["roi_align_classifier_first32"]),
                                ("mrcnn_class_logits", logits, ref["mrcnn_class_logits"]),
                                ("mrcnn_class", probs, ref["mrcnn_class"]),
                                ("mrcnn_bbox", bbox, ref["mrcnn_bbox"])]:
        assert ours.shape == theirs.shape, stage
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL, err_msg=stage)
        report(stage, float(np.abs(ours - theirs).max()))


def test_detection_layer_on_stored_inputs(coco, ref):
    model, _ = coco
    layer = model.keras_model.get_layer("mrcnn_detection")
    detections = layer([tf.constant(ref["rpn_rois"]), tf.constant(ref["mrcnn_class"]), tf.constant(ref["mrcnn_bbox"]),
                        tf.constant(ref["image_meta"].astype(np.float32))]).numpy()
    np.testing.assert_array_equal(detections[..., 4], ref["detections"][..., 4])
    np.testing.assert_allclose(detections, ref["detections"], rtol=0, atol=1e-5)
    report("DetectionLayer (stored inputs)", float(np.abs(detections - ref["detections"]).max()))


def test_mask_head_on_stored_inputs(coco, ref):
    model, _ = coco
    head = _sub_model(model.keras_model, ["fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5", "detection_boxes", "input_image_meta"],
                      ["roi_align_mask", "mrcnn_mask"])
    pooled, masks = (keras.ops.convert_to_numpy(t) for t in head(
        [ref["P2"], ref["P3"], ref["P4"], ref["P5"], ref["detections"][..., :4], ref["image_meta"].astype(np.float32)]))
    np.testing.assert_allclose(pooled[:, :8], ref["roi_align_mask_first8"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(masks[:, :8], ref["mrcnn_mask_first8"], rtol=RTOL, atol=ATOL)
    class_ids = ref["detections"][0, :, 4].astype(int)
    own = masks[0, np.arange(len(class_ids)), :, :, class_ids]
    np.testing.assert_allclose(own, ref["mrcnn_mask_detected_class"][0], rtol=RTOL, atol=ATOL)
    report("roi_align_mask (first 8)", float(np.abs(pooled[:, :8] - ref["roi_align_mask_first8"]).max()))
    report("mrcnn_mask (own class, 100)", float(np.abs(own - ref["mrcnn_mask_detected_class"][0]).max()))


# ---------------------------------------------------------------------------------------------
# Unmolding and detect()


def _mask_ious(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    inter = np.logical_and(ours, theirs).sum(axis=(0, 1))
    union = np.logical_or(ours, theirs).sum(axis=(0, 1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def _assert_detect_dict_matches(result: dict, ref: dict, stage: str) -> None:
    n = len(ref["detect_class_ids"])
    assert len(result["class_ids"]) == n
    np.testing.assert_array_equal(result["class_ids"], ref["detect_class_ids"])
    np.testing.assert_allclose(result["scores"], ref["detect_scores"], atol=1e-3, rtol=0)
    assert np.abs(result["rois"] - ref["detect_rois"]).max() <= 1
    assert result["masks"].shape == ref["detect_masks"].shape and result["masks"].dtype == bool
    ious = _mask_ious(result["masks"], ref["detect_masks"])
    assert ious.min() >= 0.99, f"{stage}: worst mask IoU {ious.min():.4f} (instance {ious.argmin()})"
    report(stage, float(np.abs(result["scores"] - ref["detect_scores"]).max()),
           f"(scores; box max {np.abs(result['rois'] - ref['detect_rois']).max()} px, "
           f"min mask IoU {ious.min():.4f}, {n} detections)")


def test_unmold_stored_detections(coco, ref):
    model, _ = coco
    # Full 28x28xC masks are only stored for the first 8; the own-class channel is what unmolding reads.
    n = ref["detections"].shape[1]
    masks = np.zeros((n, 28, 28, 81), np.float32)
    masks[np.arange(n), :, :, ref["detections"][0, :, 4].astype(int)] = ref["mrcnn_mask_detected_class"][0]
    rois, class_ids, scores, full = model.unmold_detections(ref["detections"][0], masks, ref["image"].shape,
                                                             ref["molded_image"].shape[1:], ref["window"][0])
    result = {"rois": rois, "class_ids": class_ids, "scores": scores, "masks": full}
    np.testing.assert_array_equal(rois, ref["detect_rois"])
    _assert_detect_dict_matches(result, ref, "unmold_detections (stored)")


def test_detect_end_to_end(coco, ref):
    model, _ = coco
    result = model.detect([ref["image"]])[0]
    _assert_detect_dict_matches(result, ref, "detect() end to end")
