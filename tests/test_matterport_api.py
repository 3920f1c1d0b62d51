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
# load_image_gt, data_generator, generate_random_rois, build_detection_targets


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


def test_generate_random_rois_follow_matterports_rules():
    rng = np.random.default_rng(0)
    gt_boxes = np.array([[10, 10, 20, 30], [40, 5, 60, 15]], np.int32)
    rois = modellib.generate_random_rois((64, 80, 3), 100, np.array([1, 1]), gt_boxes, rng=rng)
    assert rois.shape == (100, 4) and rois.dtype == np.int32
    assert (rois[:, 2] > rois[:, 0]).all() and (rois[:, 3] > rois[:, 1]).all()
    assert rois.min() >= 0 and rois[:, [0, 2]].max() < 64 and rois[:, [1, 3]].max() < 80
    per_box = 45                                                              # int(0.9 * 100 / 2)
    for i, (y1, x1, y2, x2) in enumerate(gt_boxes):
        near = rois[i * per_box:(i + 1) * per_box]
        h, w = y2 - y1, x2 - x1
        assert near[:, [0, 2]].min() >= max(y1 - h, 0) and near[:, [0, 2]].max() < min(y2 + h, 64)
        assert near[:, [1, 3]].min() >= max(x1 - w, 0) and near[:, [1, 3]].max() < min(x2 + w, 80)
    anywhere = modellib.generate_random_rois((64, 80, 3), 7, np.zeros(0), np.zeros((0, 4)), rng=rng)
    assert anywhere.shape == (7, 4) and (anywhere[:, 2] > anywhere[:, 0]).all()


def test_build_detection_targets_on_known_rois():
    from mrcnn.boxes import apply_box_deltas

    config = make_config("small", USE_MINI_MASK=False, TRAIN_ROIS_PER_IMAGE=8, ROI_POSITIVE_RATIO=0.25)
    masks = np.zeros((64, 64, 1), bool)
    masks[10:30, 20:50, 0] = True
    gt_boxes = np.array([[10, 20, 30, 50]], np.int32)
    rois = np.array([[10, 20, 30, 50], [11, 21, 31, 49], [0, 0, 5, 5], [50, 50, 60, 60], [40, 0, 63, 10]], np.int32)
    out_rois, class_ids, bbox, mask = modellib.build_detection_targets(
        rois, np.array([1], np.int32), gt_boxes, masks, config, rng=np.random.default_rng(0))
    assert out_rois.shape == (8, 4) and class_ids.shape == (8,) and bbox.shape == (8, 2, 4)
    assert mask.shape == (8, 28, 28, 2)
    assert class_ids.tolist()[:2] == [1, 1] and not class_ids[2:].any()       # 2 positives (= 8 * 0.25), first
    assert {tuple(r) for r in out_rois[:2]} == {(10, 20, 30, 50), (11, 21, 31, 49)}
    for i in range(2):
        refined = apply_box_deltas(out_rois[i:i + 1].astype(np.float64), bbox[i:i + 1, 1] * config.BBOX_STD_DEV)
        np.testing.assert_allclose(refined[0], gt_boxes[0], atol=1e-4)
        assert not bbox[i, 0].any() and not mask[i, :, :, 0].any()
    exact = [i for i in range(2) if tuple(out_rois[i]) == (10, 20, 30, 50)][0]
    np.testing.assert_array_equal(mask[exact, :, :, 1], 1.0)                 # the ROI is the lesion's box
    assert not bbox[2:].any() and not mask[2:].any()                          # negatives: no box, no mask
    assert {tuple(r) for r in out_rois[2:]} <= {tuple(r) for r in rois[2:]}   # 3 negatives, repeated to fill


def test_data_generator_takes_matterports_arguments_and_yields_detection_targets():
    config = make_config("small")                                            # mini masks, 64 ROIs per image
    dataset = _left_lesion_dataset(3)
    generator = modellib.data_generator(dataset, config, True, False, None, 400, 2, True)  # Matterport's order
    [inputs, outputs] = next(generator)                                                   # as the notebooks do
    images, metas, rpn_match, rpn_bbox, gt_class_ids, gt_boxes, gt_masks, rpn_rois, rois = inputs
    mrcnn_class_ids, mrcnn_bbox, mrcnn_mask = outputs
    t, c = config.TRAIN_ROIS_PER_IMAGE, config.NUM_CLASSES
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32 and rpn_match.shape[-1] == 1
    assert gt_boxes.dtype == np.int32 and gt_masks.shape == (2, *config.MINI_MASK_SHAPE, config.MAX_GT_INSTANCES)
    assert rpn_rois.shape == (2, 400, 4) and rpn_rois.dtype == np.int32 and rois.shape == (2, t, 4)
    assert mrcnn_class_ids.shape == (2, t, 1) and mrcnn_bbox.shape == (2, t, c, 4)
    assert mrcnn_mask.shape == (2, t, *config.MASK_SHAPE, c)
    for b in range(2):
        positive = mrcnn_class_ids[b, :, 0] > 0
        assert positive.any() and not mrcnn_bbox[b, ~positive].any() and not mrcnn_mask[b, ~positive].any()
        assert mrcnn_mask[b, positive, :, :, 1].max() > 0.5 and not mrcnn_mask[b, :, :, :, 0].any()
        assert {tuple(r) for r in rois[b]} <= {tuple(r) for r in rpn_rois[b]}   # targets for the random ROIs
    again = next(modellib.data_generator(dataset, config, True, False, None, 400, 2, True))
    for x, y in zip(inputs + outputs, again[0] + again[1], strict=True):
        np.testing.assert_array_equal(x, y)                                  # reproducible (config.SEED)
    plain_inputs, plain_outputs = next(modellib.data_generator(dataset, config, batch_size=2, augment=True))
    assert len(plain_inputs) == 7 and plain_outputs == []
    rois_only = next(modellib.data_generator(dataset, config, random_rois=5))
    assert len(rois_only[0]) == 8 and rois_only[0][7].shape == (1, 5, 4) and rois_only[1] == []
    with pytest.raises(TypeError):
        modellib.data_generator(dataset, config, True, False, None, 0, 1, False, None, 5)  # seed is keyword-only
