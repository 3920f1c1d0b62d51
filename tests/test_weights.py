"""Keras-2 HDF5 weight loading/saving (mrcnn/weights.py) on a ResNet-50, NUM_CLASSES=2 model.

The COCO rule-weight file (ResNet-101, 81 classes) is the "foreign" file: its shared layers
load by name, the class-specific heads are skipped with a message, the extra ResNet-101 blocks
are reported as unmatched.
"""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
from factories import make_config
from matterport_h5 import det_value, shared_coco_rule_file, write_rule_weights

from mrcnn.model import MaskRCNN
from mrcnn.weights import CLASS_SPECIFIC_LAYERS, WeightsError, layer_weight_entries, weighted_layers

HEADS = set(CLASS_SPECIFIC_LAYERS)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Matterport's defaults (full-size FPN and heads) on ResNet-50 at 128 px, few proposals.
    config = make_config("matterport", NAME="weights_test", BACKBONE="resnet50", IMAGES_PER_GPU=1,
                         IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128, POST_NMS_ROIS_INFERENCE=16,
                         DETECTION_MAX_INSTANCES=4, PRE_NMS_LIMIT=100)
    return MaskRCNN("inference", config, str(tmp_path_factory.mktemp("logs")))


@pytest.fixture(scope="module")
def coco_file(reference_dir, tmp_path_factory):
    return shared_coco_rule_file(reference_dir, tmp_path_factory)


def _values(model: MaskRCNN) -> dict[str, np.ndarray]:
    return {f"{layer}/{w}": keras.ops.convert_to_numpy(v).copy()
            for layer, entries in weighted_layers(model.keras_model).items() for w, v in entries}


def _own_layout(model: MaskRCNN) -> list[dict]:
    """Manifest-like entries describing the model's own weighted layers."""
    return [{"name": layer.name, "weights": [{"name": n, "shape": list(v.shape)} for n, v in layer_weight_entries(layer)]}
            for layer in model.keras_model.layers if layer.weights]


def test_coco_file_by_name_skips_class_heads(model, coco_file, capsys):
    path, file_values = coco_file
    report = model.load_weights(str(path), by_name=True)
    out = capsys.readouterr().out
    assert {name for name, _ in report.skipped} == HEADS
    for head in HEADS:
        assert f"skipped {head}: shape mismatch (NUM_CLASSES differs)" in out
    assert "res4w_branch2a" in report.only_in_file and not report.only_in_model
    for key, value in _values(model).items():
        if key.split("/")[0] not in HEADS:
            np.testing.assert_array_equal(value, file_values[key])


def test_strict_raises_on_class_heads(model, coco_file):
    path, _ = coco_file
    with pytest.raises(WeightsError) as info:
        model.load_weights(str(path), by_name=True, strict=True, verbose=0)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "mrcnn_" in message


def test_exclude_leaves_layers_untouched(model, coco_file):
    path, _ = coco_file
    before = _values(model)
    report = model.load_weights(str(path), by_name=True, verbose=0,
                                exclude=["mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask", "fpn_p2"])
    assert ("fpn_p2", "excluded") in report.skipped
    after = _values(model)
    np.testing.assert_array_equal(after["fpn_p2/fpn_p2/kernel:0"], before["fpn_p2/fpn_p2/kernel:0"])


def test_topological_load_of_other_architecture_fails(model, coco_file):
    path, _ = coco_file
    with pytest.raises(WeightsError, match="different architecture"):
        model.load_weights(str(path), by_name=False, verbose=0)


@pytest.mark.parametrize("layout", ["full_model_str_attrs", "weights_only_top_level_group"])
def test_other_keras2_layouts_load(model, tmp_path, layout):
    path = tmp_path / f"{layout}.h5"
    full = layout.startswith("full_model")
    values = write_rule_weights(path, _own_layout(model), full_model_layout=full, str_attrs=full,
                                top_level_group=not full)
    report = model.load_weights(str(path), by_name=False, verbose=0)
    assert len(report.loaded) == len(weighted_layers(model.keras_model)) and not report.skipped
    got = _values(model)
    assert got.keys() == values.keys()
    for key, value in values.items():
        np.testing.assert_array_equal(got[key], value)


def test_not_hdf5_is_a_one_line_error(model, tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x80\x04 this is a pickle, not HDF5")
    with pytest.raises(WeightsError) as info:
        model.load_weights(str(path), by_name=True, verbose=0)
    assert str(path) in str(info.value) and "not an HDF5 file" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="not found"):
        model.load_weights(str(tmp_path / "missing.h5"), verbose=0)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not a Keras-2 weight file"):
        model.load_weights(str(tmp_path / "plain.h5"), verbose=0)


@pytest.mark.parametrize("damage", ["first 1000 bytes", "half", "text"])
def test_truncated_or_corrupt_h5_is_a_one_line_error(model, tmp_path, damage):
    whole = tmp_path / "whole.h5"
    model.save_weights(str(whole))
    data = whole.read_bytes()
    path = tmp_path / "mask_rcnn_x_0001.h5"
    path.write_bytes({"first 1000 bytes": data[:1000], "half": data[: len(data) // 2],
                      "text": b"this is a text file, not weights\n"}[damage])
    with pytest.raises(WeightsError) as info:
        model.load_weights(str(path), by_name=True, verbose=0)
    message = str(info.value)
    assert message.startswith(f"{path} is not a readable HDF5 weights file (") and "\n" not in message
    assert "truncated or corrupt?" in message


def test_wrong_architecture_names_layer_and_shapes(model, tmp_path):
    layout = _own_layout(model)
    for layer in layout:
        if layer["name"] == "fpn_c5p5":
            layer["weights"][0]["shape"] = [1, 1, 2048, 128]
            layer["weights"][1]["shape"] = [128]
    path = tmp_path / "other_fpn.h5"
    write_rule_weights(path, layout)
    with pytest.raises(WeightsError) as info:
        model.load_weights(str(path), by_name=True, verbose=0)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "fpn_c5p5" in message and "(1, 1, 2048, 256)" in message and "(1, 1, 2048, 128)" in message


def test_save_weights_writes_keras2_layout_atomically(model, tmp_path):
    path = tmp_path / "mask_rcnn_weights_test_0001.h5"
    path.write_bytes(b"old")
    model.save_weights(str(path))
    assert not (tmp_path / (path.name + ".tmp")).exists()
    with h5py.File(path, "r") as f:
        names = [n.decode() for n in f.attrs["layer_names"]]
        assert names == [layer.name for layer in model.keras_model.layers]
        assert isinstance(f.attrs["backend"], bytes) and f.attrs["backend"] == b"tensorflow"
        assert isinstance(f.attrs["keras_version"], bytes)
        assert [n.decode() for n in f["rpn_model"].attrs["weight_names"]][0] == "rpn_conv_shared/kernel:0"
        assert f["rpn_model/rpn_conv_shared/kernel:0"].shape == (3, 3, 256, 512)
        assert f["conv1/conv1/kernel:0"].dtype == np.float32
        bn = [n.decode() for n in f["bn_conv1"].attrs["weight_names"]]
        assert bn == ["bn_conv1/gamma:0", "bn_conv1/beta:0", "bn_conv1/moving_mean:0", "bn_conv1/moving_variance:0"]
        assert len(f["input_image"].attrs["weight_names"]) == 0
    before = _values(model)
    model.keras_model.get_layer("fpn_p3").kernel.assign(det_value("scramble/kernel:0", (3, 3, 256, 256)))
    model.load_weights(str(path), verbose=0)
    after = _values(model)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def _tiny_bn_model(seed: int) -> keras.Model:
    """Dense + BatchNorm with seeded weights and moving statistics (float32)."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(2, name="fc")(inputs)))
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.uniform(0.5, 2.0, size=variable.shape).astype(np.float32))
    return model


def test_average_weight_files_is_the_mean_of_every_weight_bn_statistics_included(tmp_path):
    from mrcnn.weights import average_weight_files, load_hdf5_weights, save_hdf5_weights

    models = [_tiny_bn_model(seed) for seed in (1, 2, 3)]
    paths = [str(tmp_path / f"mask_rcnn_x_000{i}.h5") for i in (1, 2, 3)]
    for model, path in zip(models, paths, strict=True):
        save_hdf5_weights(model, path)
    out = average_weight_files(paths, tmp_path / "average.h5")
    target = _tiny_bn_model(9)
    load_hdf5_weights(target, out, by_name=True)
    assert len(target.weights) == 6  # kernel, bias, gamma, beta, moving mean, moving variance
    for i, variable in enumerate(target.weights):
        expected = np.mean([m.weights[i].numpy() for m in models], axis=0)
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["average.h5", *(p.rsplit("/", 1)[1] for p in paths)]


def test_average_weight_files_refuses_other_architectures(tmp_path):
    from mrcnn.weights import average_weight_files, save_hdf5_weights

    save_hdf5_weights(_tiny_bn_model(1), str(tmp_path / "a.h5"))
    inputs = keras.Input((3,))
    save_hdf5_weights(keras.Model(inputs, keras.layers.Dense(4, name="fc")(inputs)), str(tmp_path / "b.h5"))
    with pytest.raises(WeightsError, match=r"a\.h5: weights differ from .*b\.h5 in names or shapes.*fc/"):
        average_weight_files([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "avg.h5")
    assert not (tmp_path / "avg.h5").exists()


def test_tail_average_is_named_after_the_newest_checkpoint_and_predicts_but_never_resumes(tmp_path):
    from mrcnn import checkpoints
    from mrcnn.weights import save_hdf5_weights, write_tail_average

    run = tmp_path / "lesion20261207T0300"
    for epoch in (1, 2, 3):
        save_hdf5_weights(_tiny_bn_model(epoch), str(run / f"mask_rcnn_lesion_{epoch:04d}.h5"))
    newest = run / "mask_rcnn_lesion_0003.h5"
    assert write_tail_average(run, 1) is None and checkpoints.final_weights(newest) == newest  # off
    written = write_tail_average(run, 5)  # only three epochs exist: their mean
    assert written == run / "mask_rcnn_lesion_0003_average3.h5"
    assert checkpoints.average_of(newest) == written and checkpoints.final_weights(newest) == written
    assert checkpoints.checkpoint_epoch(written) is None  # not a checkpoint ...
    assert checkpoints.newest_checkpoint(tmp_path) == newest  # ... so --weights last resumes from epoch 3
    assert checkpoints.average_of(run / "mask_rcnn_lesion_0002.h5") is None  # another epoch's: none
    from mrcnn.weights import read_weight_file

    (variance,) = [v for n, v in read_weight_file(str(written))["bn"] if "moving_variance" in n]
    expected = np.mean([_tiny_bn_model(e).get_layer("bn").moving_variance.numpy() for e in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(variance, expected, rtol=1e-6)
