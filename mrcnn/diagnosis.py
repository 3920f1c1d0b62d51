"""Diagnosis: Mask R-CNN that also names the image's class (e.g. the 7 HAM10000 diagnoses).

A config diagnoses when ``CLASSES`` lists two or more names (:func:`mrcnn.config.diagnoses`, the
one predicate). ``DIAGNOSIS_HEAD`` picks how, in the same single model and forward pass:

* ``"roi"``: Mask R-CNN's own class head over 1 + K classes (NUM_CLASSES = 1 + K). Each ground-truth
  instance's class is its image's diagnosis. The segmentation stays class-independent:
  :class:`ClassAgnostic` gives every class the box deltas and mask of class 1 (one box regressor
  and one mask for all diagnoses, trained on every lesion; the loss uses channel 1 too), and the
  detection layer scores an ROI by its foreground probability 1 - P(background) with one NMS over
  all classes. The image's class probabilities (:class:`RoiDiagnosis`) pool the class-head
  softmax over the K foreground classes of every proposal, weighted by its foreground
  probability (DIAGNOSIS_ROI_POOLING "mean"; "top": the most lesion-like proposal alone).
* ``"image"``: the detector keeps one class (lesion, NUM_CLASSES = 2); one extra branch
  (:func:`build_image_diagnosis_head`) pools the backbone's last stage C5 and every pyramid level
  P2..P5 globally (average), concatenates and layer-normalises them, then dense 256 + ReLU,
  dropout and a dense layer to K logits; its softmax is the diagnosis.
  Its loss (``mrcnn_diagnosis_loss``) is added to the training loss, the image's label comes
  through the input pipeline (``input_gt_diagnosis``, index in CLASSES, -1 = none).

Imbalance: ``CLASS_LOSS_WEIGHTS`` ("balanced" = inverse class frequency of the training split,
:func:`balanced_class_weights`) and ``FOCAL_LOSS_GAMMA`` apply to the diagnosis loss of either
variant (:func:`mrcnn.losses.focal_cross_entropy`); ``CLASS_BALANCED_SAMPLING`` draws the training
images with probability ~ n_class^-s (:func:`sampling_probabilities`, used by the input pipeline). ``detect`` results then carry ``class_probs``
float32 [K] over CLASSES (sum 1).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf
from keras import layers as KL

from mrcnn.config import ConfigError, diagnoses

#: Name of the image-level diagnosis loss (logged next to Matterport's five).
DIAGNOSIS_LOSS = "mrcnn_diagnosis_loss"
#: Input of the image label in training (int32 per image: index in CLASSES, -1 = no label).
DIAGNOSIS_INPUT = "input_gt_diagnosis"


def uses_image_head(config: Any) -> bool:
    """True for a diagnosing config with DIAGNOSIS_HEAD "image" (extra branch, extra loss and input)."""
    return diagnoses(config) and config.DIAGNOSIS_HEAD == "image"


def uses_roi_head(config: Any) -> bool:
    """True for a diagnosing config with DIAGNOSIS_HEAD "roi" (class head over the diagnoses)."""
    return diagnoses(config) and config.DIAGNOSIS_HEAD == "roi"


def diagnosis_index(info: dict, config: Any) -> int:
    """Index in ``config.CLASSES`` of an image's ``info["diagnosis"]`` (case-insensitive); -1 if none."""
    name = info.get("diagnosis")
    if name is None:
        return -1
    lower = [str(c).lower() for c in config.CLASSES]
    return lower.index(str(name).lower()) if str(name).lower() in lower else -1


def class_counts(labels: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    """int64 [K]: how many of ``labels`` are each of ``classes`` (case-insensitive; others ignored)."""
    lower = [str(c).lower() for c in classes]
    counts = np.zeros(len(classes), dtype=np.int64)
    for label in labels:
        if label is not None and str(label).lower() in lower:
            counts[lower.index(str(label).lower())] += 1
    return counts


def balanced_class_weights(labels: Sequence[str | None], classes: Sequence[str], sampling: float = 0.0
                           ) -> list[float]:
    """Inverse-frequency weights w_c = 1 / (K q_c), q_c = the share of class c among the images
    training sees: n_c / n (scikit-learn's "balanced", w_c = n / (K n_c)) or, with class-balanced
    sampling of strength ``sampling`` = s, n_c^(1-s) / sum_k n_k^(1-s). So the weighted classes
    count equally and the q-weighted mean of the weights is 1 (the loss keeps its scale). A class
    absent from ``labels`` gets the largest weight of the present ones. Raises ConfigError without
    labels."""
    counts = class_counts(labels, classes).astype(np.float64)
    if counts.sum() == 0:
        raise ConfigError("CLASS_LOSS_WEIGHTS balanced: the training images carry no diagnosis label of CLASSES")
    present = counts > 0
    seen = np.where(present, counts, 0.0) ** (1.0 - float(sampling))
    seen[~present] = 0.0
    share = seen / seen.sum()
    weights = np.zeros(len(classes))
    weights[present] = 1.0 / (len(classes) * share[present])
    weights[~present] = weights[present].max()
    return [float(w) for w in weights]


def resolve_class_weights(config: Any, dataset: Any, verbose: bool = False) -> Any:
    """``config`` with CLASS_LOSS_WEIGHTS "balanced" replaced by the numbers from ``dataset``'s
    diagnoses (``image_info[i]["diagnosis"]``), so config.json records them; any other config is
    returned unchanged. ``verbose``: print the class counts and weights."""
    if not diagnoses(config) or config.CLASS_LOSS_WEIGHTS != "balanced":
        return config
    labels = [info.get("diagnosis") for info in dataset.image_info]
    sampling = float(config.CLASS_BALANCED_SAMPLING)
    weights = [round(w, 6) for w in balanced_class_weights(labels, config.CLASSES, sampling)]
    if verbose:
        counts = class_counts(labels, config.CLASSES)
        how = f", as drawn with CLASS_BALANCED_SAMPLING {sampling:g}" if sampling else ""
        print(f"CLASS_LOSS_WEIGHTS balanced (inverse frequency of the training split{how}): "
              + ", ".join(f"{c} {n} -> {w:.3g}" for c, n, w in zip(config.CLASSES, counts, weights, strict=True)))
    return config.replace(CLASS_LOSS_WEIGHTS=weights)


def sampling_probabilities(dataset: Any, config: Any) -> np.ndarray | None:
    """float64 [N] probability of drawing each image of ``dataset`` under CLASS_BALANCED_SAMPLING s:
    proportional to n_c^-s for an image of diagnosis c (images without a diagnosis: as the most
    frequent class); None when sampling is off or the config does not diagnose."""
    strength = float(config.CLASS_BALANCED_SAMPLING)
    if not diagnoses(config) or strength <= 0:
        return None
    index = np.array([diagnosis_index(info, config) for info in dataset.image_info])
    counts = np.bincount(index[index >= 0], minlength=len(config.CLASSES)).astype(np.float64)
    if not counts.any():
        return None
    per_image = np.where(index >= 0, counts[np.maximum(index, 0)], counts.max())
    weights = per_image ** -strength
    return weights / weights.sum()


def class_loss_weights(config: Any) -> np.ndarray | None:
    """float32 [K] per-diagnosis weights of the diagnosis loss, or None (all 1). Raises ConfigError
    for "balanced" not yet resolved (:func:`resolve_class_weights` does it from the training set)."""
    weights = config.CLASS_LOSS_WEIGHTS
    if not diagnoses(config) or weights == "none":
        return None
    if weights == "balanced":
        raise ConfigError("CLASS_LOSS_WEIGHTS balanced must be resolved from the training split before the model"
                          " is built (mrcnn.diagnosis.resolve_class_weights(config, train_dataset))")
    return np.asarray(weights, dtype=np.float32)


def roi_class_weights(config: Any) -> np.ndarray | None:
    """float32 [NUM_CLASSES]: background 1, then the diagnosis weights (ROI variant), or None."""
    weights = class_loss_weights(config)
    return None if weights is None else np.concatenate([[1.0], weights]).astype(np.float32)


def pooled_roi_probs(class_probs: np.ndarray, rois: np.ndarray, pooling: str = "mean") -> np.ndarray:
    """numpy reference of :class:`RoiDiagnosis` for one image: class_probs [R, 1 + K] and the
    proposals (y1, x1, y2, x2) [R, 4] (zero-area rows are padding, left out) -> [K], sum 1."""
    probs = np.asarray(class_probs, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    valid = (rois[:, 2] > rois[:, 0]) & (rois[:, 3] > rois[:, 1])
    fg = np.where(valid, 1.0 - probs[:, 0], -1.0)
    weights = np.maximum(fg, 0.0) if pooling == "mean" else np.zeros(len(fg))
    weights[int(np.argmax(fg))] += 1e-9
    conditional = probs[:, 1:] / np.maximum(probs[:, 1:].sum(axis=1, keepdims=True), 1e-12)
    out = (weights[:, None] * conditional).sum(axis=0)
    return (out / out.sum()).astype(np.float32)


# -------------------------------------------------------------------------------------------
# Keras layers


class RoiDiagnosis(KL.Layer):
    """[mrcnn_class [B, R, 1 + K], rois [B, R, 4]] -> class_probs [B, K] (sum 1): each proposal's
    foreground class probabilities renormalised to sum 1, then pooled over the proposals
    (zero-area rows are padding, left out) by ``pooling`` (DIAGNOSIS_ROI_POOLING):

    * ``"mean"``: weighted by each proposal's foreground probability 1 - P(background), so the
      proposals on the lesion count and those on skin hardly (one forward pass, many views);
    * ``"top"``: the proposal with the highest foreground probability alone.
    """

    def __init__(self, pooling: str = "mean", **kwargs) -> None:
        super().__init__(**kwargs)
        self.pooling = pooling

    def call(self, inputs):
        probs, rois = (tf.cast(t, tf.float32) for t in inputs)
        valid = tf.logical_and(rois[..., 2] > rois[..., 0], rois[..., 3] > rois[..., 1])
        fg = tf.where(valid, 1.0 - probs[..., 0], -1.0)
        best = tf.one_hot(tf.argmax(fg, axis=1), tf.shape(fg)[1], dtype=tf.float32)
        weights = tf.maximum(fg, 0.0) if self.pooling == "mean" else tf.zeros_like(fg)
        weights += 1e-9 * best  # the top proposal alone where nothing else counts
        conditional = probs[..., 1:] / tf.maximum(tf.reduce_sum(probs[..., 1:], axis=2, keepdims=True), 1e-12)
        pooled = tf.reduce_sum(weights[..., None] * conditional, axis=1)
        return pooled / tf.reduce_sum(pooled, axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][2] - 1)

    def get_config(self):
        return {**super().get_config(), "pooling": self.pooling}


class ClassAgnostic(KL.Layer):
    """Copy class 1's slice to every class along ``axis`` (box deltas [B, R, C, 4]: axis 2; masks
    [B, D, h, w, C]: axis -1), so detection and unmolding use one class-free box and mask."""

    def __init__(self, axis: int, **kwargs):
        super().__init__(**kwargs)
        self.axis = int(axis)

    def call(self, x):
        axis = self.axis % len(x.shape)
        one = tf.gather(x, [1], axis=axis)
        multiples = [1] * len(x.shape)
        multiples[axis] = tf.shape(x)[axis]
        return tf.tile(one, tf.stack(multiples))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


class GlobalPyramidPool(KL.Layer):
    """Feature maps [B, h_i, w_i, C_i] -> [B, sum C_i]: global average of each, concatenated."""

    def call(self, maps):
        return tf.concat([tf.reduce_mean(tf.cast(m, tf.float32), axis=[1, 2]) for m in maps], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], sum(int(s[-1]) for s in input_shape))


def pooled_image_features(feature_maps: Sequence[Any], prefix: str) -> Any:
    """``feature_maps`` [B, h_i, w_i, C_i] -> [B, sum C_i]: each averaged globally, concatenated and
    layer-normalised (layers ``{prefix}_pool``, ``{prefix}_norm``). The pyramid levels carry no
    normalisation: without it the pooled values, and so the first logits, start large and a head
    on them begins over-confident."""
    x = GlobalPyramidPool(name=f"{prefix}_pool", dtype="float32")(list(feature_maps))
    return KL.LayerNormalization(name=f"{prefix}_norm")(x)


def build_image_diagnosis_head(feature_maps: Sequence[Any], config: Any) -> tuple[Any, Any]:
    """The image-level branch on ``feature_maps`` ([C5, P2, P3, P4, P5] in the models): global
    average pooling of each, concatenated [B, C5 channels + 4 * TOP_DOWN_PYRAMID_SIZE], layer
    normalisation, dense 256 + ReLU, dropout DIAGNOSIS_DROPOUT, dense K. Returns (logits [B, K], probabilities [B, K]), float32."""
    x = pooled_image_features(feature_maps, "mrcnn_diagnosis")
    x = KL.Dense(256, activation="relu", name="mrcnn_diagnosis_fc")(x)
    x = KL.Dropout(float(config.DIAGNOSIS_DROPOUT), name="mrcnn_diagnosis_dropout")(x)
    logits = KL.Dense(len(config.CLASSES), name="mrcnn_diagnosis_logits", dtype="float32")(x)
    probs = KL.Activation("softmax", name="mrcnn_diagnosis", dtype="float32")(logits)
    return logits, probs


def class_head_context(feature_maps: Sequence[Any], config: Any) -> Any:
    """The ROI class head's view of the whole image (CLASS_HEAD_IMAGE_CONTEXT): ``feature_maps``
    ([C5, P2, P3, P4, P5] in the models) averaged globally, concatenated and layer-normalised,
    [B, C5 channels + 4 * TOP_DOWN_PYRAMID_SIZE]; None when the key is off. Its layers train with
    the model's optimiser (they are not ``mrcnn_diagnosis*`` layers)."""
    if not config.CLASS_HEAD_IMAGE_CONTEXT:
        return None
    return pooled_image_features(feature_maps, "mrcnn_class_context")


#: Name prefix of the image-level head's layers (their variables: :func:`head_variables`).
HEAD_PREFIX = "mrcnn_diagnosis"


def head_variables(keras_model: Any) -> list:
    """The trainable variables of the image-level head (layers named ``mrcnn_diagnosis*``) of
    ``keras_model``, in layer order; [] without that head or when set_trainable froze it."""
    return [v for layer in keras_model.layers if layer.name.startswith(HEAD_PREFIX)
            for v in layer.trainable_variables]


class GradientScale(KL.Layer):
    """Identity in the forward pass; the backward pass multiplies the gradient by ``factor``
    (0: no gradient, ``tf.stop_gradient``). Any tensor shape and float dtype."""

    def __init__(self, factor: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, x):
        if self.factor == 0.0:
            return tf.stop_gradient(x)
        factor = self.factor

        @tf.custom_gradient
        def scaled(t):
            return tf.identity(t), lambda dy: dy * tf.cast(factor, dy.dtype)

        return scaled(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def scale_backbone_gradient(feature_maps: Sequence[Any], config: Any) -> list:
    """``feature_maps`` (the image head's inputs) with the diagnosis loss's gradient into them
    times DIAGNOSIS_BACKBONE_GRADIENT (:class:`GradientScale`); unchanged (no layer) at 1."""
    factor = float(config.DIAGNOSIS_BACKBONE_GRADIENT)
    if factor == 1.0:
        return list(feature_maps)
    scale = GradientScale(factor, name=f"{HEAD_PREFIX}_gradient_scale")
    return [scale(m) for m in feature_maps]


def class_agnostic(bbox: Any) -> Any:
    """Box deltas [B, R, C, 4] with class 1's copied to every class (see :class:`ClassAgnostic`)."""
    return ClassAgnostic(2, name="mrcnn_bbox_agnostic", dtype="float32")(bbox)


def class_agnostic_mask(mask: Any) -> Any:
    """Masks [B, D, h, w, C] with class 1's copied to every class (see :class:`ClassAgnostic`)."""
    return ClassAgnostic(-1, name="mrcnn_mask_agnostic", dtype="float32")(mask)


def roi_diagnosis(mrcnn_class: Any, rois: Any, config: Any) -> Any:
    """class_probs [B, K] from the class head's probabilities [B, R, 1 + K] over the proposals
    [B, R, 4], pooled as DIAGNOSIS_ROI_POOLING says (:class:`RoiDiagnosis`)."""
    return RoiDiagnosis(config.DIAGNOSIS_ROI_POOLING, name="class_probs", dtype="float32")([mrcnn_class, rois])
