"""mrcnn.tf_boxes: hand-computed cases, agreement with the numpy twins and the Matterport reference."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import boxes as B
from mrcnn import tf_boxes as T


@pytest.fixture(scope="module")
def ref(reference_dir):
    return np.load(reference_dir / "matterport_utils_reference.npz")


def test_apply_box_deltas_graph_hand():
    boxes = tf.constant([[0, 0, 10, 20], [5, 5, 9, 7]], tf.float32)
    deltas = tf.constant([[0.1, -0.2, np.log(2), 0.0], [0, 0, 0, 0]], tf.float32)
    out = T.apply_box_deltas_graph(boxes, deltas)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [[-4, -4, 16, 16], [5, 5, 9, 7]], atol=1e-5)
    np.testing.assert_allclose(T.box_refinement_graph(boxes, out).numpy(), deltas.numpy(), atol=1e-6)


def test_apply_box_deltas_graph_caps_the_size_change():
    """A huge log-size delta (untrained head) gives a finite box grown 62.5x, not inf/NaN."""
    boxes = tf.constant([[0, 0, 16, 16]], tf.float32)
    out = T.apply_box_deltas_graph(boxes, tf.constant([[0, 0, 500.0, 3.0]], tf.float32)).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], [8 - 500, 8 - 8 * np.exp(3.0), 8 + 500, 8 + 8 * np.exp(3.0)], rtol=1e-5)


def test_clip_boxes_graph_hand_and_static_shape():
    boxes = tf.constant([[-0.2, 0.1, 0.5, 1.3], [0.3, 0.3, 0.4, 0.4], [1.2, 1.2, 1.5, 1.5]])
    window = tf.constant([0.0, 0.0, 1.0, 1.0])
    expected = [[0, 0.1, 0.5, 1], [0.3, 0.3, 0.4, 0.4], [1, 1, 1, 1]]
    np.testing.assert_allclose(T.clip_boxes_graph(boxes, window).numpy(), expected)

    @tf.function(input_signature=[tf.TensorSpec([3, 4], tf.float32), tf.TensorSpec([4], tf.float32)])
    def clip(b, w):
        out = T.clip_boxes_graph(b, w)
        assert out.shape.as_list() == [3, 4]
        return out

    np.testing.assert_allclose(clip(boxes, window).numpy(), expected)


def test_overlaps_graph_hand():
    a = tf.constant([[0, 0, 10, 10], [0, 0, 5, 5]], tf.float32)
    b = tf.constant([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]], tf.float32)
    np.testing.assert_allclose(T.overlaps_graph(a, b).numpy(), [[25 / 175, 1, 0], [0, 0.25, 0]], rtol=1e-6)


def test_norm_denorm_graph_hand():
    n = T.norm_boxes_graph(tf.constant([[0, 0, 256, 256], [42, 0, 213, 256]], tf.float32), tf.constant([256, 256]))
    np.testing.assert_allclose(n.numpy(), [[0, 0, 1, 1], [42 / 255, 0, 212 / 255, 1]], rtol=1e-6)
    d = T.denorm_boxes_graph(n, (256, 256))
    assert d.dtype == tf.int32
    np.testing.assert_array_equal(d.numpy(), [[0, 0, 256, 256], [42, 0, 213, 256]])
    # batched boxes [B, N, 4] broadcast too
    nb = T.norm_boxes_graph(tf.zeros([2, 3, 4]), tf.constant([64.0, 64.0]))
    assert nb.shape.as_list() == [2, 3, 4]


def test_trim_zeros_graph():
    boxes = tf.constant([[0, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 0, 0.5]])
    kept, nz = T.trim_zeros_graph(boxes, name="trim")
    np.testing.assert_array_equal(kept.numpy(), [[1, 2, 3, 4], [0, 0, 0, 0.5]])
    np.testing.assert_array_equal(nz.numpy(), [False, True, False, True])


def test_graph_ops_match_numpy_and_reference(ref):
    # float32 in both; reductions are elementwise so TF and numpy agree to float32 rounding.
    a, b, d = ref["boxes_a"], ref["boxes_b"], ref["deltas_a"]
    np.testing.assert_allclose(T.overlaps_graph(a, b).numpy(), ref["compute_overlaps_a_b"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(T.apply_box_deltas_graph(a, d).numpy(), ref["apply_box_deltas_a"], rtol=1e-6,
                               atol=1e-4)
    np.testing.assert_allclose(T.box_refinement_graph(a[:7], b).numpy(), ref["box_refinement_a7_b"], rtol=1e-5,
                               atol=1e-6)
    for h, w in ((256, 256), (200, 300)):
        np.testing.assert_allclose(T.norm_boxes_graph(a, tf.constant([h, w])).numpy(),
                                   ref[f"norm_boxes_a_{h}x{w}"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(T.denorm_boxes_graph(B.norm_boxes(a, (200, 300)), (200, 300)).numpy(),
                                  ref["denorm_of_norm_a_200x300"])


def test_utils_facade_and_batch_slice():
    from mrcnn import utils

    for name in ("Dataset", "extract_bboxes", "compute_overlaps", "non_max_suppression", "resize_image",
                 "resize_mask", "minimize_mask", "expand_mask", "unmold_mask", "mold_image", "compose_image_meta",
                 "parse_image_meta_graph", "compute_ap", "compute_recall", "generate_pyramid_anchors",
                 "compute_backbone_shapes", "norm_boxes_graph", "trim_zeros_graph", "resize"):
        assert callable(getattr(utils, name)), name
    assert utils.COCO_MODEL_URL.endswith("mask_rcnn_coco.h5")
    # utils.download_trained_weights downloads now: tested against a local server in test_downloads.py

    x = tf.reshape(tf.range(24, dtype=tf.float32), (2, 3, 4))
    y = tf.ones((2, 3))
    one = utils.batch_slice(x, lambda a: tf.reduce_sum(a, axis=1), 2)
    np.testing.assert_allclose(one.numpy(), tf.reduce_sum(x, axis=2).numpy())
    s, p = utils.batch_slice([x, y], lambda a, b: (tf.reduce_sum(a), a[:, 0] * b), 2, names=["s", "p"])
    assert s.shape == (2,) and p.shape == (2, 3)
    np.testing.assert_allclose(p.numpy(), x.numpy()[:, :, 0])
