"""Basic-block backbones (BACKBONE "resnet18" / "resnet34", BACKBONE_WIDTH) and the mask-head
knobs (MASK_HEAD_CONV_LAYERS / MASK_HEAD_CHANNELS) at 64 px; Matterport's names stay as they were."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import make_config

from mrcnn.backbone import basic_resnet_graph, build_backbone_and_fpn, resnet_graph
from mrcnn.boxes import compute_backbone_shapes
from mrcnn.config import Config, ConfigError
from mrcnn.model import MaskRCNN


def light_config(**overrides) -> Config:
    """ResNet-18 of width 16 at 64 px, a 2 x 24 mask head, small FPN and heads."""
    return make_config("matterport", **(dict(
        NAME="tiny", BACKBONE="resnet18", IMAGES_PER_GPU=1, IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64,
        RPN_ANCHOR_SCALES=[8, 16, 32, 64, 128], PRE_NMS_LIMIT=200, POST_NMS_ROIS_TRAINING=32,
        POST_NMS_ROIS_INFERENCE=16, TRAIN_ROIS_PER_IMAGE=8, DETECTION_MAX_INSTANCES=3, DETECTION_MIN_CONFIDENCE=0,
        FPN_CLASSIF_FC_LAYERS_SIZE=32, TOP_DOWN_PYRAMID_SIZE=32, MASK_POOL_SIZE=7, MASK_SHAPE=[14, 14],
        BACKBONE_WIDTH=16, MASK_HEAD_CONV_LAYERS=2, MASK_HEAD_CHANNELS=24) | overrides))


def _shapes(outputs):
    return [tuple(o.shape[1:]) for o in outputs[1:]]


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_basic_block_backbone_c2_to_c5_shapes_at_64px(name):
    image = keras.Input((64, 64, 3))
    outputs = basic_resnet_graph(image, name, stage5=True, train_bn=True)
    assert _shapes(outputs) == [(16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512)]
    narrow = basic_resnet_graph(keras.Input((64, 64, 3)), name, train_bn=None, width=32)
    assert _shapes(narrow) == [(16, 16, 32), (8, 8, 64), (4, 4, 128), (2, 2, 256)]
    assert basic_resnet_graph(keras.Input((64, 64, 3)), name, stage5=False)[4] is None


def test_resnet18_and_34_depths_and_own_layer_names():
    def convs(name):
        model = keras.Model(image := keras.Input((64, 64, 3)), basic_resnet_graph(image, name)[4])
        return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]

    r18, r34 = convs("resnet18"), convs("resnet34")
    # stem + 2 convs per block + a projection at the first block of stages 3, 4, 5
    assert len(r18) == 1 + 2 * 8 + 3 and len(r34) == 1 + 2 * 16 + 3
    assert all(n.startswith(("bres", "bconv")) for n in r18)  # never a Matterport name: COCO files skip them
    assert "bres5b_conv2" in r18 and "bres4f_conv2" in r34 and "bres3a_convproj" in r18


def test_default_backbone_keeps_matterport_layer_names():
    config = make_config("matterport", BACKBONE="resnet50")  # Matterport's FPN and heads
    image = keras.Input((64, 64, 3))
    rpn_maps, mrcnn_maps = build_backbone_and_fpn(image, config)
    names = {layer.name for layer in keras.Model(image, rpn_maps).layers}
    for expected in ("conv1", "bn_conv1", "res2a_branch2a", "res2a_branch1", "bn3d_branch2c", "res4f_branch2c",
                     "res5c_branch2c", "fpn_c5p5", "fpn_p2", "fpn_p6"):
        assert expected in names
    assert not any(n.startswith(("bres", "bbn", "bconv")) for n in names)
    assert [tuple(m.shape[1:3]) for m in rpn_maps] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert len(mrcnn_maps) == 4


def test_unknown_backbone_is_refused():
    config = light_config()
    config.set("BACKBONE", "resnet152")
    with pytest.raises(ConfigError, match="BACKBONE must be") as info:
        config.validate()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="architecture"):
        basic_resnet_graph(keras.Input((64, 64, 3)), "resnet50")
    with pytest.raises(ValueError, match="architecture"):
        resnet_graph(keras.Input((64, 64, 3)), "resnet18")


def test_new_keys_default_to_matterport_and_are_validated():
    config = Config()  # the class defaults themselves
    assert (config.BACKBONE_WIDTH, config.MASK_HEAD_CONV_LAYERS, config.MASK_HEAD_CHANNELS) == (64, 4, 256)
    light_config().validate()
    for key, value, words in [("BACKBONE_WIDTH", 0, "BACKBONE_WIDTH"), ("MASK_HEAD_CHANNELS", 0, "MASK_HEAD_CHANNELS"),
                              ("MASK_HEAD_CONV_LAYERS", 0, "MASK_HEAD_CONV_LAYERS")]:
        bad = light_config()
        bad.set(key, value)
        with pytest.raises(ConfigError, match=words):
            bad.validate()
    wide = light_config()
    wide.set("BACKBONE", "resnet50")  # BACKBONE_WIDTH 16 has no meaning for the bottleneck ResNets
    with pytest.raises(ConfigError, match="BACKBONE_WIDTH applies to resnet18/resnet34"):
        wide.validate()
    assert compute_backbone_shapes(light_config(), (64, 64)).tolist() == [[16, 16], [8, 8], [4, 4], [2, 2], [1, 1]]


def test_callable_backbone_still_used():
    calls = []

    def my_backbone(image, stage5=True, train_bn=None):
        calls.append(train_bn)
        return basic_resnet_graph(image, "resnet18", stage5=stage5, train_bn=train_bn, width=8)

    config = light_config(BACKBONE=my_backbone,
                          COMPUTE_BACKBONE_SHAPE=lambda shape: compute_backbone_shapes(light_config(), shape))
    image = keras.Input((64, 64, 3))
    build_backbone_and_fpn(image, config)
    assert calls == [config.TRAIN_BN]


def test_light_model_builds_with_slim_mask_head_and_detects(tmp_path):
    config = light_config()
    model = MaskRCNN("inference", config, str(tmp_path))
    names = {layer.name for layer in model.keras_model.layers}
    assert {"mrcnn_mask_conv1", "mrcnn_mask_conv2"} <= names and "mrcnn_mask_conv3" not in names
    assert model.keras_model.get_layer("mrcnn_mask_conv2").kernel.shape == (3, 3, 24, 24)
    assert model.keras_model.get_layer("bres2a_conv1").kernel.shape == (3, 3, 16, 16)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    result = model.detect([image])[0]
    assert result["masks"].shape[:2] == (48, 64) and len(result["scores"]) <= config.DETECTION_MAX_INSTANCES
    training = MaskRCNN("training", config, str(tmp_path))
    assert training.keras_model.get_layer("mrcnn_mask_conv2").kernel.shape == (3, 3, 24, 24)


def _bn_layers(keras_model):
    from mrcnn.backbone import BatchNorm

    return [layer for layer in keras_model.layers if isinstance(layer, BatchNorm)]


def test_inference_bn_moving_uses_moving_averages_after_training_on_batch_statistics(tmp_path):
    """TRAIN_BN = True trains on batch statistics; INFERENCE_BN "moving" makes the inference graph
    normalise with the moving averages, "same" (Matterport) keeps batch statistics there too."""
    from mrcnn.backbone import batch_norm_mode

    same = light_config(TRAIN_BN=True)
    moving = light_config(TRAIN_BN=True, INFERENCE_BN="moving")
    assert [batch_norm_mode(c, inference=True) for c in (same, moving)] == [True, False]
    assert batch_norm_mode(moving) is True  # training keeps TRAIN_BN
    frozen = light_config(INFERENCE_BN="batch")
    assert batch_norm_mode(frozen, inference=True) is True and batch_norm_mode(light_config(), inference=True) is False

    model = MaskRCNN("inference", moving, str(tmp_path)).keras_model
    bns = _bn_layers(model)
    assert len(bns) > 20 and all(layer.fixed_training is False for layer in bns)
    assert all(layer.fixed_training is True for layer in _bn_layers(MaskRCNN("training", moving, str(tmp_path)).keras_model))
    # Behaviour of the first BatchNorm: with moving mean 5 and variance 4 it computes (x - 5) / 2
    # (gamma 1, beta 0), whatever the batch; batch statistics would give each channel mean 0.
    first = model.get_layer("bbn_conv1")
    first.moving_mean.assign(np.full(first.moving_mean.shape, 5.0, np.float32))
    first.moving_variance.assign(np.full(first.moving_variance.shape, 4.0 - first.epsilon, np.float32))
    # The frozen BatchNorm is folded into its conv (mrcnn.backbone.FoldingConv2D): the conv layer
    # outputs the normalised activation, the BatchNorm passes it through.
    conv = model.get_layer("bconv1")
    assert getattr(first, "folded_into_conv", False)
    image = np.random.default_rng(1).normal(0.0, 3.0, (2, 16, 16, 3)).astype(np.float32)
    raw = tf.nn.conv2d(image, conv.kernel, strides=conv.strides, padding=conv.padding.upper()) + conv.bias
    np.testing.assert_allclose(np.asarray(conv(image)), (np.asarray(raw) - 5.0) / 2.0, rtol=1e-4, atol=1e-4)


def test_inference_bn_is_validated():
    config = light_config()
    config.set("INFERENCE_BN", "population")
    with pytest.raises(ConfigError, match="INFERENCE_BN must be same, moving or batch"):
        config.validate()


def test_rpn_conv_channels_sets_the_shared_rpn_conv_width(tmp_path):
    assert light_config().RPN_CONV_CHANNELS == 512  # Matterport's
    config = light_config(RPN_CONV_CHANNELS=40)
    model = MaskRCNN("inference", config, str(tmp_path)).keras_model
    rpn = model.get_layer("rpn_model")
    assert rpn.get_layer("rpn_conv_shared").kernel.shape == (3, 3, 32, 40)
    assert rpn.get_layer("rpn_class_raw").kernel.shape == (1, 1, 40, 6)
    config.set("RPN_CONV_CHANNELS", 0)
    with pytest.raises(ConfigError, match="RPN_CONV_CHANNELS must be a positive integer"):
        config.validate()
