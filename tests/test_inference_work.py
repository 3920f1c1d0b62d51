"""Inference skips padded detection slots: the mask head runs on the real detections only."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from factories import make_config
from helpers import lesion_image


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mrcnn.model import MaskRCNN
    keras.utils.set_random_seed(1)  # inference models are not seeded by config.SEED: fix the weights
    # More detection slots than detections survive per-class NMS, so some slots are padding.
    config = make_config("small", POST_NMS_ROIS_INFERENCE=32, DETECTION_MAX_INSTANCES=32, DETECTION_NMS_THRESHOLD=0.3)
    model = MaskRCNN("inference", config, str(tmp_path_factory.mktemp("logs")))
    logits = model.keras_model.get_layer("mrcnn_class_logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel, bias + np.array([0.0, 10.0], np.float32)])  # random init: make ROIs lesions
    return model


def test_mask_head_runs_on_real_detections_only(model):
    image = lesion_image(seed=2)[0]
    molded, metas, _ = model.mold_inputs([image])
    anchors = model.batch_anchors(molded)
    outputs = model.keras_model([molded, metas.astype(np.float32), anchors.astype(np.float32)], training=False)
    detections, masks = (keras.ops.convert_to_numpy(outputs[i]) for i in (0, 3))
    n = int((detections[0, :, 4] > 0).sum())
    assert 0 < n < model.config.DETECTION_MAX_INSTANCES, n
    assert masks.shape == (1, model.config.DETECTION_MAX_INSTANCES, 28, 28, 2)
    assert not masks[0, n:].any()  # padded slots: zeros, no work

    km = model.keras_model
    levels = [km.get_layer(n).output for n in ("fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5")]
    head = keras.Model([*levels, km.get_layer("detection_boxes").output, km.inputs[1]],
                       km.get_layer("mrcnn_mask").output)
    pyramid = keras.Model(km.inputs, levels)([molded, metas.astype(np.float32), anchors.astype(np.float32)])
    every_slot = keras.ops.convert_to_numpy(head([*pyramid, keras.ops.convert_to_tensor(detections[..., :4]),
                                                 keras.ops.convert_to_tensor(metas.astype(np.float32))]))
    assert every_slot.shape[1] == model.config.DETECTION_MAX_INSTANCES
    np.testing.assert_allclose(masks[0, :n], every_slot[0, :n], rtol=1e-5, atol=1e-6)


def test_detect_results_unchanged_by_the_trimming(model):
    results = model.detect([lesion_image(seed=2)[0]])[0]
    assert results["masks"].shape[:2] == (64, 64)
    assert len(results["scores"]) == results["masks"].shape[-1] == len(results["rois"])
    assert model.detect_trace_count == 1
