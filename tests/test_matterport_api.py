"""Matterport's signatures where users call them (issue 18, point 2): the inspect_* notebooks'
calls of load_image_gt, data_generator, MaskRCNN.ancestor / run_graph / set_trainable and the
"mrcnn_mask" layer, made with Matterport's arguments."""

from __future__ import annotations

import numpy as np
import pytest
from factories import make_config

import mrcnn.model as modellib


@pytest.fixture(scope="module")
def inference_model(tmp_path_factory):
    return modellib.MaskRCNN("inference", make_config("small"), str(tmp_path_factory.mktemp("logs")))


# ---------------------------------------------------------------------------------------------
# The layer "mrcnn_mask"


def test_mrcnn_mask_layer_has_matterports_output_shape(inference_model, tmp_path):
    config = inference_model.config
    km = inference_model.keras_model
    layer = km.get_layer("mrcnn_mask")
    mask_h, mask_w = config.MASK_SHAPE
    assert tuple(layer.output.shape[1:]) == (config.DETECTION_MAX_INSTANCES, mask_h, mask_w, config.NUM_CLASSES)
    assert km.outputs[3] is layer.output  # the model's mrcnn_mask output is this layer's
    assert [w.shape for w in layer.weights] == [(1, 1, config.MASK_HEAD_CHANNELS, config.NUM_CLASSES),
                                                (config.NUM_CLASSES,)]
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    values = inference_model.run_graph([image], [("mrcnn_mask", layer.output), ("detections", km.outputs[0])])
    assert values["mrcnn_mask"].shape == (1, config.DETECTION_MAX_INSTANCES, mask_h, mask_w, config.NUM_CLASSES)
    real = int((values["detections"][0, :, 4] > 0).sum())
    assert not values["mrcnn_mask"][0, max(real, 1):].any()  # the head runs on real detections only (at least 1)

    training = modellib.MaskRCNN("training", make_config("small", TRAIN_MASKS_ON_POSITIVES_ONLY=False), str(tmp_path))
    shape = training.keras_model.get_layer("mrcnn_mask").output.shape
    assert tuple(shape[1:]) == (training.config.TRAIN_ROIS_PER_IMAGE, mask_h, mask_w, config.NUM_CLASSES)
