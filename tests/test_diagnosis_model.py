"""A Mask R-CNN that also diagnoses (mrcnn.diagnosis): losses against hand computations, the class
weights, both variants' detect (class_probs), a few training steps without NaN, weights loading,
and one-class models unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from factories import make_config
from helpers import lesion_pairs, run_on_two_logical_cpus

import mrcnn.model as modellib
from mrcnn import diagnosis
from mrcnn import losses as L
from mrcnn.dataset import Dataset
from mrcnn.detection import DetectionLayer

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


# -------------------------------------------------------------------------------------------
# Numbers


def test_balanced_class_weights_against_hand_computation():
    # n = 4, K = 3: a 4/(3*3), b 4/(3*1); c absent gets the largest present weight
    weights = diagnosis.balanced_class_weights(["a", "A", "a", "b", None, "zzz"], ["a", "b", "c"])
    np.testing.assert_allclose(weights, [4 / 9, 4 / 3, 4 / 3])
    two = diagnosis.balanced_class_weights(["a", "a", "a", "b"], ["a", "b"])
    np.testing.assert_allclose(two, [4 / 6, 4 / 2])
    assert math.isclose(float(np.dot([0.75, 0.25], two)), 1.0)  # frequency-weighted mean 1 (all present)
    with pytest.raises(diagnosis.ConfigError, match="no diagnosis label"):
        diagnosis.balanced_class_weights([None], ["a", "b"])
    # with class-balanced sampling 0.5 training sees a and b as sqrt(3) : 1 -> q = 0.634, 0.366
    half = diagnosis.balanced_class_weights(["a", "a", "a", "b"], ["a", "b"], sampling=0.5)
    q = np.array([3 ** 0.5, 1.0]) / (3 ** 0.5 + 1)
    np.testing.assert_allclose(half, 1 / (2 * q))
    assert math.isclose(float(np.dot(q, half)), 1.0)
    # fully balanced sampling: nothing left to weigh
    np.testing.assert_allclose(diagnosis.balanced_class_weights(["a", "a", "a", "b"], ["a", "b"], 1.0), [1, 1])


def test_resolve_class_weights_writes_numbers_into_the_config():
    config = make_config("tiny", CLASSES=["mel", "nv"], CLASS_LOSS_WEIGHTS="balanced")

    class Labels:
        image_info = [{"diagnosis": d} for d in ("nv", "nv", "nv", "mel")]

    resolved = diagnosis.resolve_class_weights(config, Labels())
    assert resolved.CLASS_LOSS_WEIGHTS == [2.0, pytest.approx(0.666667)]  # 4/(2*1), 4/(2*3)
    assert config.CLASS_LOSS_WEIGHTS == "balanced"                        # the original is untouched
    np.testing.assert_allclose(diagnosis.roi_class_weights(resolved), [1.0, 2.0, 0.666667], rtol=1e-6)
    with pytest.raises(diagnosis.ConfigError, match="must be resolved from the training split"):
        diagnosis.class_loss_weights(config)


def test_focal_cross_entropy_against_hand_computation():
    logits = tf.constant([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = tf.constant([0, 2])
    p0 = math.exp(2) / (math.exp(2) + 2)           # 0.78699
    p1 = 1 / (2 + math.e)                          # 0.21194
    ce = [-math.log(p0), -math.log(p1)]
    np.testing.assert_allclose(L.focal_cross_entropy(labels, logits).numpy(), ce, rtol=1e-5)
    focal = [ce[0] * (1 - p0) ** 2, ce[1] * (1 - p1) ** 2]
    np.testing.assert_allclose(L.focal_cross_entropy(labels, logits, gamma=2.0).numpy(), focal, rtol=1e-5)
    weights = np.array([3.0, 1.0, 0.5], np.float32)
    np.testing.assert_allclose(L.focal_cross_entropy(labels, logits, weights, 2.0).numpy(),
                               [3 * focal[0], 0.5 * focal[1]], rtol=1e-5)
    # stable for huge logits (log-softmax), float16 logits accepted
    big = L.focal_cross_entropy(tf.constant([1]), tf.constant([[1e4, -1e4]], tf.float16), weights[:2], 2.0)
    assert np.isfinite(big.numpy()).all() and big.numpy()[0] > 1e3


def test_image_diagnosis_loss_ignores_unlabelled_images():
    logits = tf.constant([[2.0, 0.0, 0.0], [5.0, 5.0, 5.0], [0.0, 1.0, 0.0]])
    labels = tf.constant([0, -1, 2])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (2 + math.e))) / 2
    assert math.isclose(float(L.image_diagnosis_loss(labels, logits)), expected, rel_tol=1e-5)
    assert float(L.image_diagnosis_loss(tf.constant([-1, -1]), logits[:2])) == 0.0


def test_weighted_class_loss_reduces_to_matterports_and_weighs_per_roi():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(2, 5, 3)).astype(np.float32))
    targets = tf.constant([[1, 2, 0, 0, 0], [2, 0, 0, 0, 0]])
    active = tf.ones((2, 3))
    plain = float(L.mrcnn_class_loss(targets, logits, active))
    assert math.isclose(float(L.weighted_class_loss(targets, logits, active)), plain, rel_tol=1e-6)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits).numpy()
    w = np.array([1.0, 4.0, 0.5], np.float32)
    expected = float((ce * w[targets.numpy()]).sum() / ce.size)
    assert math.isclose(float(L.weighted_class_loss(targets, logits, active, w)), expected, rel_tol=1e-5)
    np.testing.assert_array_equal(L.agnostic_class_ids(targets).numpy(), np.minimum(targets.numpy(), 1))


def test_label_smoothing_by_hand_and_roi_background_stays_one_hot():
    """Image head (all classes smoothed): s = 0.3 over 3 classes -> target [0.1 0.1 0.8] for label 2.
    ROI head (first_smoothed 1): a lesion ROI (label 2) gets [0, 0.15, 0.85]; background (0) one-hot."""
    logits = np.array([[0.0, 1.0, 0.0], [1.0, 0.5, -1.0]], np.float32)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    image = L.focal_cross_entropy(tf.constant([2, 2]), tf.constant(logits), smoothing=0.3).numpy()
    np.testing.assert_allclose(image, -(log_p * [0.1, 0.1, 0.8]).sum(axis=1), rtol=1e-5)
    roi = L.focal_cross_entropy(tf.constant([2, 0]), tf.constant(logits), smoothing=0.3, first_smoothed=1).numpy()
    np.testing.assert_allclose(roi, [-(log_p[0] * [0.0, 0.15, 0.85]).sum(), -log_p[1, 0]], rtol=1e-5)
    # through the ROI head's loss: the mean over the kept ROIs, with class weights on top
    w = np.array([1.0, 2.0, 4.0], np.float32)
    loss = L.weighted_class_loss(tf.constant([[2, 0]]), tf.constant(logits[None]), tf.ones((1, 3)), w, 0.0, 0.3)
    assert math.isclose(float(loss), (4.0 * roi[0] + 1.0 * roi[1]) / 2, rel_tol=1e-5)
    assert math.isclose(float(L.image_diagnosis_loss(tf.constant([2, -1]), tf.constant(logits), smoothing=0.3)),
                        image[0], rel_tol=1e-5)


def test_roi_diagnosis_pools_the_proposals_by_foreground_probability():
    """Image 0: foreground 0.1 / 0.8 / 0.7, renormalised class probs [.5 .5], [.25 .75], [6/7 1/7]:
    "mean" = (0.1 [.5 .5] + 0.8 [.25 .75] + 0.7 [6/7 1/7]) / 1.6 = [0.53125 0.46875], "top" = ROI 1.
    Image 1: ROI 0 has zero area (padding) and is left out, though its foreground is the highest."""
    probs = np.array([[[0.9, 0.05, 0.05], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]],
                      [[0.1, 0.45, 0.45], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]], np.float32)
    rois = np.array([[[0.1, 0.1, 0.5, 0.5]] * 3, [[0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]]],
                    np.float32)
    expected = {"mean": [[0.53125, 0.46875], [1.0, 0.0]], "top": [[0.25, 0.75], [1.0, 0.0]]}
    for pooling, want in expected.items():
        out = diagnosis.RoiDiagnosis(pooling)([tf.constant(probs), tf.constant(rois)]).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)
        for i in range(2):
            np.testing.assert_allclose(diagnosis.pooled_roi_probs(probs[i], rois[i], pooling), out[i], rtol=1e-6, atol=1e-7)


def test_detection_layer_scores_foreground_for_a_diagnosing_class_head():
    """An ROI with P(bg) 0.4 and 0.3 / 0.3 on two diagnoses is a lesion (score 0.6) for the ROI
    variant; Matterport's argmax would call it background. Overlapping ROIs of different classes
    are one lesion (one NMS over classes)."""
    rois = tf.constant([[[0.1, 0.1, 0.6, 0.6], [0.12, 0.1, 0.6, 0.62], [0.7, 0.7, 0.9, 0.9]]])
    probs = tf.constant([[[0.4, 0.3, 0.3], [0.2, 0.1, 0.7], [0.9, 0.05, 0.05]]])
    deltas = tf.zeros((1, 3, 3, 4))
    meta = tf.constant([[0, 64, 64, 3, 64, 64, 3, 0, 0, 64, 64, 1, 0, 0, 0]], tf.float32)
    dx = make_config("small", CLASSES=["a", "b"], DETECTION_MIN_CONFIDENCE=0.0, DETECTION_NMS_THRESHOLD=0.5)
    out = DetectionLayer(dx)([rois, probs, deltas, meta]).numpy()[0]
    kept = out[out[:, 4] > 0]
    assert len(kept) == 1                           # ROI 0 and 1 overlap: one lesion, ROI 2 is background
    np.testing.assert_allclose(kept[0, 4:], [2, 0.8], rtol=1e-6)   # class 'b', score 1 - 0.2
    plain = make_config("small", NUM_CLASSES=3, DETECTION_MIN_CONFIDENCE=0.0, DETECTION_NMS_THRESHOLD=0.5)
    out = DetectionLayer(plain)([rois[:, :1], probs[:, :1], deltas[:, :1], meta]).numpy()[0]
    assert not (out[:, 4] > 0).any()                # Matterport: argmax is background


# -------------------------------------------------------------------------------------------
# Models (small preset: a stand-in backbone, 64 px)


class LabelledDataset(Dataset):
    """In-memory lesions with a diagnosis each; instance class = diagnosis for the ROI variant."""

    def __init__(self, pairs, head: str) -> None:
        super().__init__()
        names = HAM if head == "roi" else ["lesion"]
        for i, name in enumerate(names, start=1):
            self.add_class("x", i, name)
        for i, (image, masks) in enumerate(pairs):
            dx = HAM[i % len(HAM)]
            self.add_image("x", i, None, image=image, masks=masks, diagnosis=dx,
                           instance_class=HAM.index(dx) + 1 if head == "roi" else 1)
        self.prepare()

    def load_image(self, image_id):
        return self.image_info[image_id]["image"]

    def load_mask(self, image_id):
        masks = self.image_info[image_id]["masks"]
        return masks, np.full([masks.shape[-1]], self.image_info[image_id]["instance_class"], np.int32)


#: The variants the module trains: the two heads, and the ROI head that also sees the whole image.
VARIANTS = {"roi": {}, "image": {}, "roi_context": {"CLASS_HEAD_IMAGE_CONTEXT": True}}


def _dx_config(variant: str, **overrides):
    head = "image" if variant == "image" else "roi"
    return make_config("small", CLASSES=HAM, DIAGNOSIS_HEAD=head, **VARIANTS[variant], **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{variant: checkpoint} after 3 training steps of each variant (weights + focal loss on)."""
    out = {}
    for head in VARIANTS:
        logs = tmp_path_factory.mktemp(f"dxlogs_{head}")  # one run folder each (they are named by minute)
        config = _dx_config(head, IMAGES_PER_GPU=2, STEPS_PER_EPOCH=3, VALIDATION_STEPS=1, LEARNING_RATE=0.01,
                            CLASS_LOSS_WEIGHTS=[1.0, 2.0, 1.0, 3.0, 1.0, 0.5, 2.0], FOCAL_LOSS_GAMMA=2.0)
        dataset = LabelledDataset(lesion_pairs(8), config.DIAGNOSIS_HEAD)
        model = modellib.MaskRCNN("training", config, str(logs))
        history = model.train(dataset, dataset, 0.01, 1, "all", list_layers=False)
        out[head] = (model.find_last(), history.history, dataset)
    return out


@pytest.mark.parametrize("head", list(VARIANTS))
def test_training_steps_stay_finite_and_log_the_diagnosis_loss(trained, head):
    _, history, _ = trained[head]
    assert all(np.isfinite(v).all() for v in history.values())
    assert ("mrcnn_diagnosis_loss" in history) == (head == "image")
    if head == "image":
        assert history["mrcnn_diagnosis_loss"][0] > 0 and history["val_mrcnn_diagnosis_loss"][0] > 0


@pytest.mark.parametrize("head", list(VARIANTS))
def test_detect_returns_class_probs_over_classes(trained, head):
    checkpoint, _, dataset = trained[head]
    model = modellib.MaskRCNN("inference", _dx_config(head), "unused")
    report = model.load_weights(checkpoint, by_name=True, verbose=0)
    assert not report.skipped
    results = model.detect([dataset.load_image(0)])
    probs = results[0]["class_probs"]
    assert probs.shape == (7,) and probs.dtype == np.float32
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5) and (probs >= 0).all()
    assert results[0]["masks"].shape[:2] == (64, 64)
    if head != "image":  # class-free masks: every detection's class uses the same (class 1) mask
        assert set(results[0]["class_ids"]) <= set(range(1, 8))
    else:
        assert set(results[0]["class_ids"]) <= {1}


def test_one_class_model_has_no_class_probs_and_loads_into_dx_models(trained, tmp_path):
    one = make_config("small", CLASSES=["lesion"])
    assert one.NUM_CLASSES == 2
    model = modellib.MaskRCNN("inference", one, str(tmp_path))
    result = model.detect([lesion_pairs(1)[0][0]])[0]
    assert set(result) == {"rois", "class_ids", "scores", "masks"}
    assert len(model.keras_model.outputs) == 7
    path = str(tmp_path / "one.h5")
    model.save_weights(path)
    # a one-class checkpoint into the image variant: the detector loads, the new head keeps its init
    image = modellib.MaskRCNN("inference", _dx_config("image"), str(tmp_path))
    report = image.load_weights(path, by_name=True, verbose=0)
    assert "mrcnn_diagnosis_logits" in report.only_in_model and not report.skipped
    # ... into the ROI variant: the class-specific layers are skipped with the reason
    roi = modellib.MaskRCNN("inference", _dx_config("roi"), str(tmp_path))
    report = roi.load_weights(path, by_name=True, verbose=0)
    assert {name for name, _ in report.skipped} == {"mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_mask"}
    assert all("NUM_CLASSES differs" in why for _, why in report.skipped)
    # an image-variant checkpoint of 7 classes into one of 3: the diagnosis head is skipped
    checkpoint, _, _ = trained["image"]
    three = modellib.MaskRCNN("inference", make_config("small", CLASSES=["mel", "nv", "bcc"], DIAGNOSIS_HEAD="image"),
                              str(tmp_path))
    report = three.load_weights(checkpoint, by_name=True, verbose=0)
    assert [name for name, _ in report.skipped] == ["mrcnn_diagnosis_logits"]
    assert "the number of CLASSES differs" in report.skipped[0][1]


def test_image_context_adds_one_linear_term_per_image_to_the_class_logits(trained):
    """CLASS_HEAD_IMAGE_CONTEXT: logits = W_roi . roi_features + W_ctx . context + b, the context the
    layer-normalised global means of C5 and P2..P5. With W_roi = 0 every ROI of an image gets
    softmax(W_ctx . context + b), computed here by hand from the model's own feature maps."""
    import keras

    checkpoint, _, dataset = trained["roi_context"]
    config = _dx_config("roi_context")
    model = modellib.MaskRCNN("inference", config, "unused")
    model.load_weights(checkpoint, by_name=True, verbose=0)
    km = model.keras_model
    logits_layer = km.get_layer("mrcnn_class_logits")
    kernel, bias = [np.asarray(w) for w in logits_layer.get_weights()]
    fc = config.FPN_CLASSIF_FC_LAYERS_SIZE
    context_size = kernel.shape[0] - fc
    assert context_size == km.get_layer("mrcnn_class_context_pool").output.shape[-1] > 0
    assert km.get_layer("mrcnn_bbox_fc").get_weights()[0].shape[0] == fc  # the box branch is unchanged
    rng = np.random.default_rng(0)
    w_ctx = rng.normal(0, 0.5, (context_size, config.NUM_CLASSES)).astype(np.float32)
    logits_layer.set_weights([np.concatenate([np.zeros((fc, config.NUM_CLASSES), np.float32), w_ctx]), bias])

    image = dataset.load_image(0)
    pool = km.get_layer("mrcnn_class_context_pool")
    probe = keras.Model(km.inputs, [km.get_layer("mrcnn_class").output, *pool.input])
    molded, metas, windows = model.mold_inputs([image])
    anchors = np.broadcast_to(model.get_anchors(molded[0].shape), (1, *model.get_anchors(molded[0].shape).shape))
    class_probs, *maps = probe.predict([molded, metas, anchors], verbose=0)
    pooled = np.concatenate([m.astype(np.float64).mean(axis=(1, 2)) for m in maps], axis=-1)[0]
    norm = km.get_layer("mrcnn_class_context_norm")
    gamma, beta = [np.asarray(w, np.float64) for w in norm.get_weights()]
    context = (pooled - pooled.mean()) / np.sqrt(pooled.var() + norm.epsilon) * gamma + beta
    expected = context @ w_ctx + bias
    expected = np.exp(expected - expected.max())
    expected /= expected.sum()
    np.testing.assert_allclose(class_probs[0], np.broadcast_to(expected, class_probs[0].shape), atol=1e-4)


def test_training_input_carries_the_diagnosis_index():
    from mrcnn.input_pipeline import build_training_sample, get_training_anchors, input_names, sample_specs

    config = _dx_config("image")
    dataset = LabelledDataset(lesion_pairs(5), "image")
    sample = build_training_sample(dataset, config, 4, get_training_anchors(config), rng=np.random.default_rng(0))
    assert int(sample["input_gt_diagnosis"]) == HAM.index("mel") == 4
    assert input_names(config)[-1] == "input_gt_diagnosis" and "input_gt_diagnosis" in sample_specs(config)
    roi = _dx_config("roi")
    assert "input_gt_diagnosis" not in input_names(roi)
    assert "input_gt_diagnosis" not in build_training_sample(LabelledDataset(lesion_pairs(1), "roi"), roi, 0,
                                                             get_training_anchors(roi))


def test_class_balanced_sampling_probabilities_and_draws():
    from mrcnn.input_pipeline import SampleSource

    class Labels:
        image_ids = np.arange(5)
        image_info = [{"diagnosis": d} for d in ("a", "a", "a", "b", None)]

    full = make_config("small", CLASSES=["a", "b"], CLASS_BALANCED_SAMPLING=1.0)
    # weights 1/3, 1/3, 1/3, 1, 1/3 (no label: as the most frequent class) -> sum 7/3
    np.testing.assert_allclose(diagnosis.sampling_probabilities(Labels(), full), [1 / 7, 1 / 7, 1 / 7, 3 / 7, 1 / 7])
    half = make_config("small", CLASSES=["a", "b"], CLASS_BALANCED_SAMPLING=0.5)
    w = np.array([3 ** -0.5] * 3 + [1.0, 3 ** -0.5])
    np.testing.assert_allclose(diagnosis.sampling_probabilities(Labels(), half), w / w.sum())
    assert diagnosis.sampling_probabilities(Labels(), make_config("small", CLASSES=["a", "b"])) is None
    source = SampleSource(Labels(), full, shuffle=True, seed=3, balanced=True)
    draws = np.array([source.image_for(i) for i in range(5 * 400)])
    assert abs(np.mean(draws == 3) - 3 / 7) < 0.04          # the rare class about 3 times as often as each other image
    plain = SampleSource(Labels(), full, shuffle=True, seed=3)  # validation: no resampling
    assert sorted(plain.image_for(i) for i in range(5)) == [0, 1, 2, 3, 4]


# -------------------------------------------------------------------------------------------
# The image head's own optimiser (DIAGNOSIS_OPTIMIZER "adamw") and DIAGNOSIS_BACKBONE_GRADIENT


def _image_batch(config, n: int = 2) -> dict:
    from mrcnn.input_pipeline import build_training_sample, get_training_anchors, input_names

    dataset = LabelledDataset(lesion_pairs(n), "image")
    anchors = get_training_anchors(config)
    samples = [build_training_sample(dataset, config, i, anchors, rng=np.random.default_rng(i)) for i in range(n)]
    return {k: tf.constant(np.stack([s[k] for s in samples])) for k in input_names(config)}


#: DIAGNOSIS_LEARNING_RATE / LEARNING_RATE = 0.3; a large decay so that it shows in one step.
ADAMW = dict(DIAGNOSIS_HEAD="image", DIAGNOSIS_OPTIMIZER="adamw", DIAGNOSIS_DROPOUT=0.0, LEARNING_RATE=0.01,
             DIAGNOSIS_LEARNING_RATE=0.003, DIAGNOSIS_WEIGHT_DECAY=0.5, DIAGNOSIS_BACKBONE_GRADIENT=0.5,
             IMAGES_PER_GPU=2, TRAIN_ROIS_PER_IMAGE=8, ROI_POSITIVE_RATIO=0.25, GRADIENT_CLIP_NORM=0.05)


@pytest.fixture(scope="module")
def adamw_model(tmp_path_factory):
    from mrcnn.training import set_trainable

    config = make_config("small", CLASSES=HAM, **ADAMW)
    model = modellib.MaskRCNN("training", config, str(tmp_path_factory.mktemp("adamw")))
    set_trainable(model, "all")
    return model, _image_batch(config)


def _one_step(km, config, batch, start, main_lr: float) -> list[np.ndarray]:
    """Weights after one train step from ``start`` with ``config``'s optimisers, the SGD's rate set
    to ``main_lr`` after compiling (as TimeBudget does)."""
    from mrcnn.training import compile_training_model

    km.set_weights(start)
    compile_training_model(km, config.LEARNING_RATE, config)
    km.optimizer.learning_rate = main_lr
    tf.function(km.train_step)(batch)
    return [np.array(w) for w in km.get_weights()]


def test_adamw_updates_the_head_by_adamw_and_every_other_variable_as_sgd(adamw_model):
    from mrcnn.training import FollowingLearningRate

    model, batch = adamw_model
    km, config = model.keras_model, model.config
    start = [np.array(w) for w in km.get_weights()]
    head = {id(v) for v in diagnosis.head_variables(km)}
    names = [v.path for v in km.weights]
    is_head = [id(v) in head for v in km.weights]
    assert sorted(n for n, h in zip(names, is_head, strict=True) if h) == sorted(
        f"mrcnn_diagnosis_{layer}/{w}" for layer, w in [("norm", "gamma"), ("norm", "beta"), ("fc", "kernel"),
                                                        ("fc", "bias"), ("logits", "kernel"), ("logits", "bias")])

    # the head's gradient (only its own loss reaches it), clipped per variable as Keras does
    with tf.GradientTape() as tape:
        loss = km(list(batch.values()), training=True)[-1]
    grads = [np.array(g) for g in tape.gradient(loss, diagnosis.head_variables(km))]

    shared = _one_step(km, config.replace(DIAGNOSIS_OPTIMIZER="shared"), batch, start, 0.02)
    assert km.diagnosis_optimizer is None
    adamw = _one_step(km, config, batch, start, 0.02)
    optimizer = km.diagnosis_optimizer
    assert isinstance(optimizer, __import__("keras").optimizers.AdamW) and int(optimizer.iterations) == 1
    assert isinstance(optimizer._learning_rate, FollowingLearningRate)

    rate, clip, (b1, b2), eps = 0.02 * 0.3, 0.05, (0.9, 0.999), 1e-7
    by_path = dict(zip([v.path for v in diagnosis.head_variables(km)], grads, strict=True))
    checked = 0
    for name, w0, w_sgd, w_adamw, own in zip(names, start, shared, adamw, is_head, strict=True):
        if not own:  # every other variable: exactly the SGD-only step
            # two compiled steps sum gradients in different orders (1e-4 of the variable's largest
            # update) and may round the new weight to a neighbouring float32 (one ulp of w)
            bound = 1e-4 * np.abs(w_sgd - w0).max() + 1.5 * np.spacing(np.abs(w0)) + 1e-12
            np.testing.assert_array_less(np.abs(w_adamw - w_sgd), bound, err_msg=name)
            checked += int(np.abs(w_sgd - w0).max() > 0)
            continue
        g = by_path[name]
        g = g * clip / max(float(np.linalg.norm(g)), clip)
        m, v = (1 - b1) * g, (1 - b2) * g * g                      # Keras Adam, first step
        alpha = rate * math.sqrt(1 - b2) / (1 - b1)
        decay = 0.0 if name.endswith(("gamma", "beta")) else rate * 0.5 * w0
        np.testing.assert_allclose(w_adamw, w0 - decay - alpha * m / (np.sqrt(v) + eps), rtol=1e-4, atol=1e-7,
                                   err_msg=name)
        assert not np.allclose(w_adamw, w_sgd)
    assert checked > 20  # the step moved the backbone, RPN and heads

    # the head's rate follows the SGD's wherever it is set, by DIAGNOSIS_LEARNING_RATE / LEARNING_RATE
    for main in (0.01, 0.0005):
        km.optimizer.learning_rate = main
        assert math.isclose(float(optimizer.learning_rate), main * 0.3, rel_tol=1e-6)
    # compiling again gives a fresh AdamW; a plain Keras compile drops it
    from mrcnn.training import compile_training_model
    compile_training_model(km, 0.01, config)
    assert km.diagnosis_optimizer is not optimizer and int(km.diagnosis_optimizer.iterations) == 0
    km.compile(optimizer="sgd")
    assert km.diagnosis_optimizer is None


def test_gradient_scale_is_identity_forward_and_scales_the_gradient():
    x = tf.constant([[1.0, -2.0, 3.0]])
    for factor, expected in [(0.25, [0.25, 0.5, 0.75]), (0.0, [0.0, 0.0, 0.0]), (3.0, [3.0, 6.0, 9.0])]:
        layer = diagnosis.GradientScale(factor)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.constant([[1.0, 2.0, 3.0]]))  # d loss / d y = [1, 2, 3]
        np.testing.assert_array_equal(y.numpy(), x.numpy())
        grad = tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        np.testing.assert_allclose(grad.numpy(), [expected])


def test_backbone_gradient_scales_only_the_diagnosis_losss_pull_on_the_backbone(adamw_model):
    model, batch = adamw_model
    km = model.keras_model
    scale = km.get_layer("mrcnn_diagnosis_gradient_scale")
    assert scale.factor == 0.5  # DIAGNOSIS_BACKBONE_GRADIENT
    targets = [km.get_layer("fpn_p5").kernel, *diagnosis.head_variables(km)[-2:]]

    def diagnosis_grads(factor):
        scale.factor = factor
        with tf.GradientTape() as tape:
            loss = km(list(batch.values()), training=True)[-1]
        return [np.array(g) for g in tape.gradient(loss, targets)]

    try:
        half, full = diagnosis_grads(0.5), diagnosis_grads(1.0)
    finally:
        scale.factor = 0.5
    assert np.abs(full[0]).max() > 0
    np.testing.assert_allclose(half[0], 0.5 * full[0], rtol=1e-5, atol=1e-12)  # into the pyramid: halved
    for a, b in zip(half[1:], full[1:], strict=True):                          # the head's own: unchanged
        np.testing.assert_array_equal(a, b)


def test_adamw_head_under_mixed_precision_trains_and_stays_finite(tmp_path):
    import keras

    from mrcnn.training import compile_training_model, set_trainable

    config = make_config("small", CLASSES=HAM, MIXED_PRECISION=True, **ADAMW)
    model = modellib.MaskRCNN("training", config, str(tmp_path))
    km = model.keras_model
    set_trainable(model, "all")
    compile_training_model(km, 0.01, config)
    assert isinstance(km.diagnosis_optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(km.diagnosis_optimizer.inner_optimizer, keras.optimizers.AdamW)
    before = [np.array(v) for v in diagnosis.head_variables(km)]
    step = tf.function(km.train_step)
    for _ in range(4):  # dynamic loss scaling may skip the first steps (float16 overflow)
        logs = {k: float(v) for k, v in step(_image_batch(config)).items()}
        assert all(math.isfinite(v) for v in logs.values()), logs
        after = [np.array(v) for v in diagnosis.head_variables(km)]
        if any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
            break
    else:
        pytest.fail("4 mixed-precision steps left the diagnosis head unchanged")
    assert all(np.isfinite(w).all() for w in km.get_weights())


MIRRORED_ADAMW = """
    KEYS = dict(CLASSES=["a", "b", "c"], DIAGNOSIS_HEAD="image", DIAGNOSIS_OPTIMIZER="adamw", DIAGNOSIS_DROPOUT=0.0,
                ROI_POSITIVE_RATIO=1.0, DIAGNOSIS_LEARNING_RATE=0.01, LEARNING_RATE=0.01)

    def step(config, weights=None):
        model = MaskRCNN("training", config, MODEL_DIR)
        km = model.keras_model
        if weights is not None:
            km.set_weights(weights)
        start = [np.array(w) for w in km.get_weights()]
        set_trainable(model, "all")
        compile_training_model(km, 0.01, config)
        batch = dict(training_inputs(config, 2), input_gt_diagnosis=np.array([2, 1], np.int32))
        ds = tf.data.Dataset.from_tensors({k: tf.constant(v) for k, v in batch.items()}).repeat()
        km.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)
        head = [w.path.startswith("mrcnn_diagnosis") for w in km.weights]
        delta = [np.array(w) - s for w, s in zip(km.get_weights(), start)]
        return km, start, head, delta

    km1, start, head, delta1 = step(make_config("small", IMAGES_PER_GPU=2, **KEYS))
    km2, _, _, delta2 = step(make_config("small", GPU_COUNT=2, IMAGES_PER_GPU=1, **KEYS), start)

    def rel(own):
        a = np.concatenate([d.ravel() for d, h in zip(delta1, head) if h == own])
        b = np.concatenate([d.ravel() for d, h in zip(delta2, head) if h == own])
        return float(np.linalg.norm(a - b) / np.linalg.norm(a)), float(np.linalg.norm(a))

    print("RESULT" + json.dumps({
        "replicas": km2.distribute_strategy.num_replicas_in_sync,
        "optimizer": type(km2.diagnosis_optimizer).__name__,
        "iterations": int(km2.diagnosis_optimizer.iterations.numpy()),
        "head": rel(True), "rest": rel(False),
    }))
"""


def test_adamw_head_under_mirrored_strategy_matches_one_device(tmp_path):
    """Two logical CPUs, one image each, against one device with both: the same update."""
    result = run_on_two_logical_cpus(MIRRORED_ADAMW, tmp_path)
    assert (result["replicas"], result["optimizer"], result["iterations"]) == (2, "FusedAdamW", 1)
    for part in ("head", "rest"):
        diff, norm = result[part]
        assert norm > 0 and diff < 1e-3, (part, result)
