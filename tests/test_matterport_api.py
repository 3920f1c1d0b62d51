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


# ---------------------------------------------------------------------------------------------
# run_graph, ancestor, set_trainable


def test_run_graph_takes_images_as_molded_when_metas_are_given(inference_model, capsys):
    km = inference_model.keras_model
    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    outputs = [("rpn_class", km.get_layer("rpn_class").output), ("proposals", km.get_layer("ROI").output)]
    from_raw = inference_model.run_graph([image], outputs)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["rpn_class", "proposals"] and "shape:" in printed[0]
    molded, metas, _ = inference_model.mold_inputs([image])
    from_molded = inference_model.run_graph(molded, outputs, metas, verbose=0)  # Matterport's positional call
    assert capsys.readouterr().out == ""
    for name, value in from_raw.items():
        np.testing.assert_allclose(from_molded[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_ancestor_walks_a_keras3_functional_graph(inference_model):
    import keras

    x = keras.Input((4,), name="x")
    a = keras.layers.Dense(3, name="dense_a")(x)
    b = keras.layers.Dense(2, name="dense_b")(a)
    joined = keras.layers.Concatenate(name="joined")([a, b])
    out = keras.layers.Dense(1, name="out")(joined)
    find = inference_model.ancestor
    assert find(out, "joined") is joined
    assert find(out, "dense_a") is a and find(out, "dense_b:0") is b and find(out, "x") is x
    assert find(out, "dense_.*") is a        # nearest first: a feeds `joined` directly
    assert find(out, "dense_b:1") is None and find(out, "missing") is None and find(out, "out") is None
    checked: list = []
    assert find(out, "x", checked) is x and any(t is a for t in checked)
    with pytest.raises(TypeError, match="symbolic"):
        find(np.zeros(3), "x")

    km = inference_model.keras_model
    pillar = km.get_layer("ROI").output       # the inspect_model notebook's starting point
    assert find(pillar, "rpn_class") is km.get_layer("rpn_class").output
    assert find(pillar, "input_anchors") is km.inputs[2]
    assert find(pillar, "ROI/rpn_non_max_suppression:0") is None   # a TF op inside a layer: not in Keras 3's graph
    values = inference_model.run_graph([np.zeros((64, 64, 3), np.uint8)],
                                       [("rpn_bbox", find(pillar, "rpn_bbox"))], verbose=0)
    assert values["rpn_bbox"].shape[-1] == 4
    with pytest.raises(ValueError, match="no tensor for nms"):
        inference_model.run_graph([np.zeros((64, 64, 3), np.uint8)], [("nms", None)])


def test_set_trainable_prints_the_trainable_layers_when_verbose(inference_model, capsys):
    inference_model.set_trainable(r"(mrcnn\_mask.*)|(rpn\_.*)")     # Matterport's default verbose=1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Selecting layers to train"
    assert "In model:  rpn_model" in lines
    assert any(line.split() == ["mrcnn_mask", "(MaskPredictor)"] for line in lines)
    assert any(line.startswith("    rpn_conv_shared") and line.endswith("(Conv2D)") for line in lines)
    assert not any("mrcnn_class_conv1" in line for line in lines)   # not trainable: not listed
    assert inference_model.keras_model.get_layer("mrcnn_mask").trainable
    assert not inference_model.keras_model.get_layer("mrcnn_class_conv1").trainable
    inference_model.set_trainable(".*", verbose=0)
    assert capsys.readouterr().out == ""
    assert inference_model.keras_model.get_layer("mrcnn_class_conv1").trainable


def test_train_lists_the_layers_as_matterport_unless_told_not_to(tmp_path, capsys):
    from helpers import array_dataset, lesion_pairs

    config = make_config("small", STEPS_PER_EPOCH=1, VALIDATION_STEPS=0)
    model = modellib.MaskRCNN("training", config, str(tmp_path))
    dataset = array_dataset(lesion_pairs(2))
    model.train(dataset, None, learning_rate=0.001, epochs=1, layers="heads")
    out = capsys.readouterr().out
    assert "Selecting layers to train" in out and "mrcnn_mask " in out and "tiny_c1" not in out
    model.train(dataset, None, learning_rate=0.001, epochs=2, layers="all", list_layers=False)
    assert "Selecting layers to train" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# load_image_gt


def _left_lesion_dataset(n: int = 1):
    """64x64 images, one lesion in the left half (so a left-right flip shows), and their masks."""
    from helpers import array_dataset

    pairs = []
    for i in range(n):
        image = np.full((64, 64, 3), 200, np.uint8)
        mask = np.zeros((64, 64, 1), bool)
        mask[10 + i:40, 4:24 + i] = True
        image[mask[:, :, 0]] = 60
        pairs.append((image, mask))
    return array_dataset(pairs)


def test_load_image_gt_takes_matterports_arguments_and_augment_flips():
    config = make_config("small")
    dataset = _left_lesion_dataset()
    image, meta, class_ids, bbox, mini = modellib.load_image_gt(dataset, config, 0, False, None, True)  # positional
    assert mini.shape == (*config.MINI_MASK_SHAPE, 1) and class_ids.tolist() == [1]
    full = modellib.load_image_gt(dataset, config, 0, use_mini_mask=False)[4]
    flipped = 0
    for seed in range(8):
        f_image, f_meta, f_ids, f_bbox, f_mask = modellib.load_image_gt(dataset, config, 0, augment=True, seed=seed)
        np.testing.assert_array_equal(f_meta, meta)
        np.testing.assert_array_equal(f_ids, class_ids)
        if np.array_equal(f_image, image):
            np.testing.assert_array_equal(f_mask, full)
            np.testing.assert_array_equal(f_bbox, bbox)
        else:
            flipped += 1
            np.testing.assert_array_equal(f_image, image[:, ::-1])
            np.testing.assert_array_equal(f_mask, full[:, ::-1])
            y1, x1, y2, x2 = bbox[0]
            assert f_bbox[0].tolist() == [y1, 64 - x2, y2, 64 - x1]
        again = modellib.load_image_gt(dataset, config, 0, True, seed=seed)[0]
        np.testing.assert_array_equal(again, f_image)                         # reproducible with seed
    assert 0 < flipped < 8
    from mrcnn.input_pipeline import default_augmentation

    with pytest.raises(TypeError, match="augmentation="):
        modellib.load_image_gt(dataset, config, 0, default_augmentation(1))   # our old position of augmentation
    with pytest.raises(TypeError):
        modellib.load_image_gt(dataset, config, 0, False, None, False, 5)     # seed is keyword-only
