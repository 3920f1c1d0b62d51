"""Training: the training-mode graph, which layers train, the optimiser, and the fit loop.

* :func:`build_training_model` - Matterport's training graph (inputs in Matterport's order,
  anchors a constant for IMAGE_SHAPE, 14 outputs ending with the 5 named loss tensors) as a
  :class:`TrainingModel`, a Keras 3 functional model with its own ``train_step``/``test_step``.
* :func:`set_trainable` / :data:`LAYER_REGEX` - which layers train ("heads", "3+", ... or a regex).
* :func:`train` - Matterport's ``MaskRCNN.train`` contract: ``epochs`` is the absolute final
  epoch, one atomic checkpoint per epoch, CSV + TensorBoard logs, NaN/Inf guard, resumable.

The callbacks live in :mod:`mrcnn.train_callbacks`; the input pipeline in :mod:`mrcnn.input_pipeline`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from keras import layers as KL

from mrcnn import losses as L
from mrcnn import multiworker, optimizer_state, tf_boxes
from mrcnn.config import LOSS_NAMES, loss_scaled
from mrcnn.diagnosis import (
    DIAGNOSIS_LOSS,
    build_image_diagnosis_head,
    class_head_context,
    class_loss_weights,
    head_variables,
    roi_class_weights,
    scale_backbone_gradient,
    uses_image_head,
    uses_roi_head,
)
from mrcnn.errors import TrainingDivergedError
from mrcnn.input_pipeline import check_augmentation, get_training_anchors, input_names, make_dataset
from mrcnn.optimizers import FusedAdamW, FusedSGD
from mrcnn.targets import DetectionTargetLayer
from mrcnn.train_callbacks import (
    EpochCheckpoint,
    NonFiniteGuard,
    SafeCSVLogger,
    ScalarSummaries,
)

logger = logging.getLogger(__name__)

__all__ = ["LAYER_REGEX", "FollowingLearningRate", "TrainingDivergedError", "TrainingModel", "build_training_model",
           "compile_training_model", "make_diagnosis_optimizer", "set_trainable", "train"]

#: Matterport's ``layers=`` presets (full-match regexes on layer names).
LAYER_REGEX = {
    "heads": r"(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "3+": r"(res3.*)|(bn3.*)|(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "4+": r"(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "5+": r"(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "all": ".*",
}


# -------------------------------------------------------------------------------------------
# Small graph layers

class NormBoxes(KL.Layer):
    """Pixel boxes [B, G, 4] -> normalised boxes for the image [B, H, W, C] (y1, x1, y2, x2)."""

    def call(self, inputs):
        boxes, image = inputs
        return tf_boxes.norm_boxes_graph(boxes, tf.shape(image)[1:3])

    def compute_output_shape(self, input_shape):
        return input_shape[0]


class ConstantAnchors(KL.Layer):
    """Normalised anchors for IMAGE_SHAPE as a constant, broadcast to the batch: [B, A, 4]."""

    def __init__(self, anchors: np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        self.anchors = np.asarray(anchors, np.float32)

    def call(self, image):
        anchors = tf.constant(self.anchors)
        return tf.broadcast_to(anchors[tf.newaxis], [tf.shape(image)[0], *self.anchors.shape])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.anchors.shape)


class MetaActiveClasses(KL.Layer):
    """image_meta [B, 12 + C] -> active_class_ids [B, C]."""

    def call(self, meta):
        return meta[:, 12:]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] - 12)


class PositiveRois(KL.Layer):
    """[rois [B, T, 4], target_class_ids [B, T]] -> rois [B, n, 4]: the first n rois, n = the most
    positive ROIs (class id > 0) of any image in the batch, at least 1, at most ``count``.

    DetectionTargetLayer puts each image's positives first (then negatives, then zero padding), so
    the mask head runs on the real positives only: the slot of ``count`` =
    TRAIN_ROIS_PER_IMAGE * ROI_POSITIVE_RATIO rows (66 of Matterport's 200) is mostly padding
    while few proposals overlap the ground truth, and each row costs ~3 GFLOP (forward +
    backward, 4 x 256 head). The loss only reads positive rows, so it is unchanged.
    """

    def __init__(self, count: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.count = int(count)

    def call(self, inputs):
        rois, target_class_ids = inputs
        positives = tf.reduce_sum(tf.cast(target_class_ids[:, : self.count] > 0, tf.int32), axis=1)
        n = tf.maximum(tf.reduce_max(positives), 1)
        return rois[:, :n]

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], None, *input_shape[0][2:])


class Identity(KL.Layer):
    """Pass-through, to give a tensor a layer name (e.g. "output_rois")."""

    def call(self, x):
        return tf.identity(x)

    def compute_output_shape(self, input_shape):
        return input_shape


class LossLayer(KL.Layer):
    """Scalar loss ``fn(*inputs)`` as a named layer (float32)."""

    def __init__(self, fn, **kwargs) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.fn = fn

    def call(self, inputs):
        return tf.reshape(tf.cast(self.fn(*inputs), tf.float32), [])

    def compute_output_shape(self, input_shape):
        return ()


# -------------------------------------------------------------------------------------------
# The model

class TrainingModel(keras.Model):
    """Functional training graph with Matterport's optimisation in ``train_step``.

    Each step minimises sum(LOSS_WEIGHTS[k] * loss_k) + L2 decay (mean square per weight tensor
    times WEIGHT_DECAY, BN gamma/beta excluded; none with OPTIMIZER "adamw", whose decay is
    decoupled). Logged: ``loss`` and the 5 weighted losses.
    With ``diagnosis_optimizer`` (DIAGNOSIS_OPTIMIZER "adamw", attached by
    :func:`compile_training_model`) that optimiser updates the image head's variables and the L2
    term leaves them out; ``optimizer`` updates the rest exactly as without it.
    """

    def __init__(self, *args, config=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mrcnn_config = config
        self.loss_names = loss_names(config)
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", *self.loss_names)}
        self.diagnosis_optimizer = None

    def compile(self, *args, **kwargs) -> None:
        """Keras compile; drops the image head's own optimiser (compile_training_model attaches a fresh one)."""
        self.diagnosis_optimizer = None
        super().compile(*args, **kwargs)

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    def _model_inputs(self, data) -> list:
        if isinstance(data, dict):
            return [data[name] for name in input_names(self.mrcnn_config)]
        return list(data[0] if len(data) == 1 else data)

    def _loss_terms(self, outputs) -> dict[str, tf.Tensor]:
        """Weighted losses keyed by :func:`loss_names` (the last 5 or 6 model outputs)."""
        weights = loss_weights(self.mrcnn_config)
        return {name: tf.cast(value, tf.float32) * float(weights[name])
                for name, value in zip(self.loss_names, outputs[-len(self.loss_names):], strict=True)}

    def _record(self, total, terms) -> dict[str, tf.Tensor]:
        self.loss_trackers["loss"].update_state(total)
        for name, value in terms.items():
            self.loss_trackers[name].update_state(value)
        logs = {name: tracker.result() for name, tracker in self.loss_trackers.items()}
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras averages the logs over all workers' replicas with reduce(MEAN, axis=0), which
            # needs an axis: shape [1] makes it the mean of the replicas' values (a scalar).
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    @property
    def _l2_weight_decay(self) -> float:
        """WEIGHT_DECAY of the L2 loss term; 0 with OPTIMIZER "adamw" (its decay is decoupled)."""
        return 0.0 if self.mrcnn_config.OPTIMIZER == "adamw" else self.mrcnn_config.WEIGHT_DECAY

    def _own_head_ids(self) -> set[int]:
        """ids of the variables the image head's own optimiser updates (none without one)."""
        return {id(v) for v in head_variables(self)} if self.diagnosis_optimizer is not None else set()

    def main_optimizer_variables(self) -> list:
        """The trainable variables ``optimizer`` updates: all but those of the image head's own optimiser."""
        own = self._own_head_ids()
        return [v for v in self.trainable_variables if id(v) not in own]

    def train_step(self, data):
        inputs = self._model_inputs(data)
        variables = self.trainable_variables
        own = self._own_head_ids()
        with tf.GradientTape() as tape:
            # training=True whatever TRAIN_BN says: BatchNorm keeps its pinned mode (frozen = moving
            # statistics, mrcnn.backbone.BatchNorm), dropout is active, and a conv with a folded
            # frozen BatchNorm takes its training form (FoldingConv2D: one conv, no BatchNorm pass,
            # no loss gradient for its bias).
            outputs = self(inputs, training=True)
            terms = self._loss_terms(outputs)
            decay = L.weight_decay_loss([v for v in variables if id(v) not in own], self._l2_weight_decay)
            total = tf.add_n(list(terms.values())) + decay
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        grads = _sum_before_clipping(tape.gradient(scaled, variables), replicas, self.mrcnn_config)
        grads, variables = _with_gradients(grads, variables)
        if own:
            head = [(g, v) for g, v in zip(grads, variables, strict=True) if id(v) in own]
            rest = [(g, v) for g, v in zip(grads, variables, strict=True) if id(v) not in own]
            self._apply_diagnosis_gradients(*zip(*head, strict=True))  # first: it reads this step's loss scale
            grads, variables = (list(x) for x in zip(*rest, strict=True))
        self.optimizer.apply(grads, variables)
        return self._record(total, terms)

    def _apply_diagnosis_gradients(self, grads, variables) -> None:
        """The head's own optimiser on its gradients. Under mixed precision they carry the main
        optimiser's loss scale: rescaled to the head's (both powers of two, so exactly), whose
        LossScaleOptimizer unscales them and skips the step if any is not finite."""
        head = self.diagnosis_optimizer
        if isinstance(head, keras.optimizers.LossScaleOptimizer):
            ratio = _loss_scale(head) / _loss_scale(self.optimizer)
            grads = [None if g is None else g * tf.cast(ratio, g.dtype) for g in grads]
        head.apply(list(grads), list(variables))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds a distributed model from the MEAN over replicas of the first batch, which
        fails on the bool gt masks (AddN); build from the first replica's share instead."""
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, it in iterator:
                data_batch = _first_replica(self.distribute_strategy, next(it))
                break
        return super()._maybe_symbolic_build(data_batch=data_batch)

    def test_step(self, data):
        outputs = self(self._model_inputs(data), training=False)
        terms = self._loss_terms(outputs)
        return self._record(tf.add_n(list(terms.values())), terms)


def _loss_scale(optimizer) -> Any:
    """The loss scale a LossScaleOptimizer's ``scale_loss`` applies now (its initial one before it is built)."""
    return optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale


def _sum_before_clipping(grads: list, replicas: int, config) -> list:
    """Make the optimiser clip the gradient of the whole global batch, as one device would.

    Keras 3 clips each replica's gradient before it sums them over replicas. With several
    replicas and clipping on, sum here first and hand every replica sum / N: Keras then clips
    sum / N at GRADIENT_CLIP_NORM / N (see make_optimizer) and sums N equal copies, which is
    exactly clip(sum, GRADIENT_CLIP_NORM), per variable or global alike (clipping is positively
    homogeneous). One device, or clipping off: unchanged.
    """
    if replicas == 1 or config.GRADIENT_CLIP_NORM is None:
        return grads
    context = tf.distribute.get_replica_context()
    present = [g for g in grads if g is not None]
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(summed) / replicas for g in grads]


def _with_gradients(grads: list, variables: list) -> tuple[list, list]:
    """The (gradient, variable) pairs whose gradient exists, as two lists. A conv bias in front of
    a frozen BatchNorm (FoldingConv2D) has none when no L2 term reaches it (WEIGHT_DECAY 0, AdamW):
    by design, so the optimiser is not handed it (Keras would skip it too, with a warning)."""
    pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
    return [g for g, _ in pairs], [v for _, v in pairs]


def _first_replica(strategy, batch):
    """The first replica's part of a (possibly) distributed batch."""
    def local(x):
        return strategy.experimental_local_results(x)[0] if isinstance(x, tf.distribute.DistributedValues) else x
    return tf.nest.map_structure(local, batch)


def loss_names(config) -> tuple[str, ...]:
    """Matterport's five loss names, plus ``mrcnn_diagnosis_loss`` with the image-level diagnosis head."""
    from mrcnn.diagnosis import DIAGNOSIS_LOSS, uses_image_head

    return LOSS_NAMES + ((DIAGNOSIS_LOSS,) if uses_image_head(config) else ())


def loss_weights(config) -> dict[str, float]:
    """LOSS_WEIGHTS plus DIAGNOSIS_LOSS_WEIGHT for the image-level diagnosis loss."""
    from mrcnn.diagnosis import DIAGNOSIS_LOSS

    return {**config.LOSS_WEIGHTS, DIAGNOSIS_LOSS: float(config.DIAGNOSIS_LOSS_WEIGHT)}


def _training_inputs(config) -> list:
    """keras.Input tensors in Matterport's training order (see mrcnn.input_pipeline for shapes)."""
    h, w, c = (int(v) for v in config.IMAGE_SHAPE)
    mask_hw = tuple(config.MINI_MASK_SHAPE) if config.USE_MINI_MASK else (h, w)
    return [
        keras.Input((h, w, c), name="input_image"),
        keras.Input((int(config.IMAGE_META_SIZE),), name="input_image_meta"),
        keras.Input((None, 1), name="input_rpn_match", dtype="int32"),
        keras.Input((None, 4), name="input_rpn_bbox", dtype="float32"),
        keras.Input((None,), name="input_gt_class_ids", dtype="int32"),
        keras.Input((None, 4), name="input_gt_boxes", dtype="float32"),
        keras.Input((*mask_hw, None), name="input_gt_masks", dtype="bool"),
    ] + ([keras.Input((), name="input_gt_diagnosis", dtype="int32")] if uses_image_head(config) else [])


def _normalised_training_anchors(config) -> np.ndarray:
    from mrcnn.boxes import norm_boxes
    return norm_boxes(get_training_anchors(config), tuple(int(v) for v in config.IMAGE_SHAPE[:2]))


def _loss_layers(config, rpn_match, rpn_bbox_target, rpn_class_logits, rpn_bbox, target_class_ids,
                 mrcnn_class_logits, active_class_ids, target_bbox, mrcnn_bbox, target_mask, mrcnn_mask) -> list:
    """The 5 named scalar loss tensors (unweighted, as Matterport's Lambda layers).

    A diagnosing model with DIAGNOSIS_HEAD "roi" weighs the class loss by CLASS_LOSS_WEIGHTS and
    FOCAL_LOSS_GAMMA, smooths its diagnosis labels by DIAGNOSIS_LABEL_SMOOTHING and trains one
    class-free box regressor and mask (class 1's) on every lesion.
    """
    class_loss, box_mask_ids = L.mrcnn_class_loss, (lambda ids: ids)
    if uses_roi_head(config):
        weights, gamma = roi_class_weights(config), float(config.FOCAL_LOSS_GAMMA)
        smoothing = float(config.DIAGNOSIS_LABEL_SMOOTHING)
        if weights is not None or gamma or smoothing:
            def class_loss(*a):
                return L.weighted_class_loss(*a, class_weights=weights, gamma=gamma, smoothing=smoothing)
        box_mask_ids = L.agnostic_class_ids
    return [
        LossLayer(L.rpn_class_loss, name="rpn_class_loss")([rpn_match, rpn_class_logits]),
        LossLayer(lambda *a: L.rpn_bbox_loss(config, *a), name="rpn_bbox_loss")([rpn_bbox_target, rpn_match, rpn_bbox]),
        LossLayer(class_loss, name="mrcnn_class_loss")([target_class_ids, mrcnn_class_logits, active_class_ids]),
        LossLayer(lambda t, ids, p: L.mrcnn_bbox_loss(t, box_mask_ids(ids), p),
                  name="mrcnn_bbox_loss")([target_bbox, target_class_ids, mrcnn_bbox]),
        LossLayer(lambda t, ids, p: L.mrcnn_mask_loss(t, box_mask_ids(ids), p),
                  name="mrcnn_mask_loss")([target_mask, target_class_ids, mrcnn_mask]),
    ]


def _image_diagnosis_loss(config, labels, feature_maps) -> tuple[list, list]:
    """(outputs, losses) of the image-level diagnosis head on ``feature_maps`` [C5, P2..P5]:
    ([logits, probs], [mrcnn_diagnosis_loss])."""
    logits, probs = build_image_diagnosis_head(scale_backbone_gradient(feature_maps, config), config)
    weights, gamma = class_loss_weights(config), float(config.FOCAL_LOSS_GAMMA)
    smoothing = float(config.DIAGNOSIS_LABEL_SMOOTHING)
    loss = LossLayer(lambda y, z: L.image_diagnosis_loss(y, z, weights, gamma, smoothing),
                     name=DIAGNOSIS_LOSS)([labels, logits])
    return [logits, probs], [loss]


def _build_graph(config) -> TrainingModel:
    from mrcnn.backbone import build_backbone_and_fpn
    from mrcnn.heads import build_fpn_mask_graph, fpn_classifier_graph
    from mrcnn.inference_graph import build_rpn_for_config, check_image_shape
    from mrcnn.rpn import ProposalLayer, apply_rpn

    check_image_shape(config)
    inputs = _training_inputs(config)
    image, meta, rpn_match, rpn_bbox_target, gt_class_ids, gt_boxes_px, gt_masks = inputs[:7]
    gt_boxes = NormBoxes(name="input_gt_boxes_norm", dtype="float32")([gt_boxes_px, image])
    rpn_feature_maps, mrcnn_feature_maps, c5 = build_backbone_and_fpn(image, config, return_c5=True)
    anchors = ConstantAnchors(_normalised_training_anchors(config), name="anchors", dtype="float32")(image)
    rpn_class_logits, rpn_class, rpn_bbox = apply_rpn(build_rpn_for_config(config), rpn_feature_maps)
    rpn_rois = ProposalLayer(config.POST_NMS_ROIS_TRAINING, config.RPN_NMS_THRESHOLD, config,
                             name="ROI")([rpn_class, rpn_bbox, anchors])
    active_class_ids = MetaActiveClasses(name="active_class_ids", dtype="float32")(meta)
    rois, target_class_ids, target_bbox, target_mask = DetectionTargetLayer(config, name="proposal_targets")(
        [rpn_rois, gt_class_ids, gt_boxes, gt_masks])
    mrcnn_class_logits, mrcnn_class, mrcnn_bbox = fpn_classifier_graph(
        rois, mrcnn_feature_maps, meta, config.POOL_SIZE, config.NUM_CLASSES, train_bn=config.TRAIN_BN,
        fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE, roi_min_level=config.CLASSIFIER_ROI_MIN_LEVEL,
        class_dropout=config.CLASS_HEAD_DROPOUT,
        image_context=class_head_context([c5, *mrcnn_feature_maps], config))
    mask_rois, positives = rois, None
    if config.TRAIN_MASKS_ON_POSITIVES_ONLY:  # the mask layer pads back to the static slot, zero rows
        positives = int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO)
        mask_rois = PositiveRois(positives, name="positive_rois", dtype="float32")([rois, target_class_ids])
    mrcnn_mask = build_fpn_mask_graph(mask_rois, mrcnn_feature_maps, meta, config.MASK_POOL_SIZE,
                                      config.NUM_CLASSES, train_bn=config.TRAIN_BN,
                                      conv_layers=config.MASK_HEAD_CONV_LAYERS, channels=config.MASK_HEAD_CHANNELS,
                                      pad_to=positives)
    output_rois = Identity(name="output_rois", dtype="float32")(rois)
    loss_outputs = _loss_layers(config, rpn_match, rpn_bbox_target, rpn_class_logits, rpn_bbox, target_class_ids,
                                mrcnn_class_logits, active_class_ids, target_bbox, mrcnn_bbox, target_mask,
                                mrcnn_mask)
    diagnosis_outputs: list = []
    if uses_image_head(config):
        diagnosis_outputs, diagnosis_loss = _image_diagnosis_loss(config, inputs[7], [c5, *mrcnn_feature_maps])
        loss_outputs += diagnosis_loss
    outputs = [rpn_class_logits, rpn_class, rpn_bbox, mrcnn_class_logits, mrcnn_class, mrcnn_bbox, mrcnn_mask,
               rpn_rois, output_rois, *diagnosis_outputs, *loss_outputs]
    return TrainingModel(inputs, outputs, name="mask_rcnn", config=config)


def distribution_strategy(config) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when ``TF_CONFIG`` names a cluster of several workers (see
    :mod:`mrcnn.multiworker`; each worker must have GPU_COUNT devices), else MirroredStrategy over
    GPU_COUNT GPUs (or logical CPUs when no GPU), else the default."""
    cluster = multiworker.cluster_from_env()
    if cluster is not None:
        strategy = multiworker.strategy(cluster, config.MULTI_WORKER_TIMEOUT)
        local = strategy.num_replicas_in_sync // cluster.size
        if local != config.GPU_COUNT:
            raise multiworker.ClusterConfigError(
                f"GPU_COUNT is {config.GPU_COUNT} but this worker trains on {local} device(s) (all its visible GPUs,"
                " else its CPU): set GPU_COUNT to that number, or choose the GPUs with CUDA_VISIBLE_DEVICES")
        return strategy
    if config.GPU_COUNT <= 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus if len(gpus) >= config.GPU_COUNT else tf.config.list_logical_devices("CPU")
    if len(devices) < config.GPU_COUNT:
        raise ValueError(f"GPU_COUNT is {config.GPU_COUNT} but only {len(devices)} devices are visible")
    return tf.distribute.MirroredStrategy([d.name for d in devices[: config.GPU_COUNT]])


def build_training_model(config) -> TrainingModel:
    """Training-mode Mask R-CNN for ``config``.

    Inputs (Matterport order): input_image [B, H, W, C] (molded, H x W = IMAGE_SHAPE),
    input_image_meta [B, META], input_rpn_match [B, A, 1] int32, input_rpn_bbox [B, R, 4],
    input_gt_class_ids [B, G] int32, input_gt_boxes [B, G, 4] (pixels, y1, x1, y2, x2),
    input_gt_masks [B, mh, mw, G] bool. Outputs: rpn_class_logits, rpn_class, rpn_bbox,
    mrcnn_class_logits, mrcnn_class, mrcnn_bbox, mrcnn_mask, rpn_rois, output_rois, then the
    scalar losses rpn_class_loss, rpn_bbox_loss, mrcnn_class_loss, mrcnn_bbox_loss,
    mrcnn_mask_loss. Built under the mixed policy MIXED_PRECISION names, inside a
    MirroredStrategy scope when GPU_COUNT > 1. With config.SEED the initial weights are reproducible.
    """
    from mrcnn.inference_graph import dtype_policy

    strategy = distribution_strategy(config)  # first: a multi-worker strategy must precede every TF op
    if _seed(config) is not None:
        keras.utils.set_random_seed(_seed(config))  # reproducible initial weights
    with dtype_policy(config), strategy.scope():
        return _build_graph(config)


# -------------------------------------------------------------------------------------------
# Trainable layers and optimiser

def _inner(layer):
    return getattr(layer, "layer", layer)  # TimeDistributed -> wrapped layer


def set_trainable(model, layer_regex: str, verbose: int = 0, indent: int = 0) -> list[str]:
    """Make exactly the weighted layers whose names full-match ``layer_regex`` (or a preset
    name from LAYER_REGEX) trainable; nested models (rpn_model) are entered. Returns the
    names of the trainable layers. ``model`` is a MaskRCNN or a Keras model.

    With ``verbose`` > 0 it prints what Matterport's ``MaskRCNN.set_trainable`` prints: a line
    "Selecting layers to train", then one line per trainable layer, its name and class (``indent``
    spaces first), and "In model:  <name>" before the layers of a nested model (indented 4 more).
    """
    regex = LAYER_REGEX.get(layer_regex, layer_regex)
    keras_model = getattr(model, "keras_model", model)
    keras_model.trainable = True
    trainable: list[str] = []
    if verbose > 0:
        print("Selecting layers to train")

    def visit(container, depth: int) -> None:
        for layer in container.layers:
            if isinstance(layer, keras.Model):
                layer.trainable = True
                if verbose > 0:
                    print("In model: ", layer.name)
                visit(layer, depth + 4)
                continue
            if not layer.weights:
                continue
            on = re.fullmatch(regex, layer.name) is not None
            _inner(layer).trainable = on
            layer.trainable = on
            if on:
                trainable.append(layer.name)
                if verbose > 0:
                    print(f"{' ' * depth}{layer.name:20}   ({type(_inner(layer)).__name__})")

    visit(keras_model, indent)
    return trainable


def _clipping(config) -> dict[str, float | None]:
    """Keras optimiser arguments for GRADIENT_CLIP_NORM / GRADIENT_CLIP_MODE.

    "per_variable" clips each variable's gradient (Keras 3 ``clipnorm``), "global" their joint
    norm (``global_clipnorm``: Matterport's Keras 2 ``clipnorm``). Under a strategy with N replicas
    the threshold is divided by N: see :func:`_sum_before_clipping`.
    """
    clip = config.GRADIENT_CLIP_NORM
    if clip is not None:
        clip = clip / tf.distribute.get_strategy().num_replicas_in_sync
    per_variable = config.GRADIENT_CLIP_MODE == "per_variable"
    return {"clipnorm": clip if per_variable else None, "global_clipnorm": None if per_variable else clip}


def make_optimizer(config, learning_rate: float, variables: list | None = None) -> keras.optimizers.Optimizer:
    """The whole model's optimiser (OPTIMIZER, Keras's with TF's fused update kernels,
    :mod:`mrcnn.optimizers`): SGD with LEARNING_MOMENTUM, or AdamW with decoupled
    decay ADAMW_WEIGHT_DECAY (not on the ``variables`` that :func:`mrcnn.losses.is_decayed` leaves
    out: BN / LayerNorm gamma and beta); gradients clipped to GRADIENT_CLIP_NORM
    (:func:`_clipping`); a moving average of the weights with WEIGHTS_EMA > 0 (:func:`_averaging`);
    loss-scaled under float16 MIXED_PRECISION (:func:`mrcnn.config.loss_scaled`)."""
    if config.OPTIMIZER == "adamw":
        optimizer = FusedAdamW(learning_rate=learning_rate, weight_decay=config.ADAMW_WEIGHT_DECAY,
                                           **_clipping(config), **_averaging(config))
        # by name too, so that variables the optimiser first sees later follow the same rule
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables or [] if not L.is_decayed(v)],
                                            var_names=list(L.UNDECAYED_NAMES))
    else:
        optimizer = FusedSGD(learning_rate=learning_rate, momentum=config.LEARNING_MOMENTUM,
                                         **_clipping(config), **_averaging(config))
    if loss_scaled(config):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _averaging(config) -> dict[str, Any]:
    """Keras optimiser arguments for WEIGHTS_EMA: the average is kept by the optimiser and copied
    into the model only when training ends (checkpoints take it via
    :func:`mrcnn.optimizer_state.averaged_weights`)."""
    if not config.WEIGHTS_EMA:
        return {}
    return {"use_ema": True, "ema_momentum": float(config.WEIGHTS_EMA), "ema_overwrite_frequency": None}


class FollowingLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """``factor`` x the current learning rate of ``optimizer``, read at every step: a second
    optimiser whose rate follows whatever sets the first one's (warm-up, cosine, stages)."""

    def __init__(self, optimizer: keras.optimizers.Optimizer, factor: float) -> None:
        self.optimizer = optimizer
        self.factor = float(factor)

    def __call__(self, step):
        return tf.cast(self.optimizer.learning_rate, tf.float32) * self.factor

    def get_config(self) -> dict[str, float]:
        return {"factor": self.factor}


def make_diagnosis_optimizer(config, optimizer: keras.optimizers.Optimizer,
                             variables: list) -> keras.optimizers.Optimizer | None:
    """The image head's own optimiser for DIAGNOSIS_OPTIMIZER "adamw", built for ``variables``
    (:func:`mrcnn.diagnosis.head_variables`); None with "shared", without the image head or with
    the head frozen.

    Keras AdamW, learning rate :class:`FollowingLearningRate` of ``optimizer`` times
    DIAGNOSIS_LEARNING_RATE / LEARNING_RATE, decoupled weight decay DIAGNOSIS_WEIGHT_DECAY (not on
    LayerNorm gamma/beta), clipped as the SGD (:func:`_clipping`); loss-scaled as the SGD.
    Call it in the strategy scope (its slots are mirrored like the SGD's).
    """
    if config.DIAGNOSIS_OPTIMIZER != "adamw" or not uses_image_head(config) or not variables:
        return None
    rate = FollowingLearningRate(optimizer, config.DIAGNOSIS_LEARNING_RATE / config.LEARNING_RATE)
    adamw = FusedAdamW(learning_rate=rate, weight_decay=config.DIAGNOSIS_WEIGHT_DECAY,
                                   name="diagnosis_adamw", **_clipping(config))
    adamw.exclude_from_weight_decay(var_list=[v for v in variables if not L.is_decayed(v)])
    head = keras.optimizers.LossScaleOptimizer(adamw) if loss_scaled(config) else adamw
    head.build(variables)
    return head


def compile_training_model(keras_model: TrainingModel, learning_rate: float, config) -> None:
    """Attach fresh optimisers: the SGD and, with DIAGNOSIS_OPTIMIZER "adamw", the image head's
    AdamW (resets train functions; call after set_trainable). Both are built here, for the
    variables each updates (Keras would build them so at the first step), so that a saved state
    can be restored before fit (:mod:`mrcnn.optimizer_state`)."""
    with keras_model.distribute_strategy.scope():
        optimizer = make_optimizer(config, learning_rate, keras_model.trainable_variables)
        keras_model.compile(optimizer=optimizer, jit_compile=False)
        keras_model.diagnosis_optimizer = make_diagnosis_optimizer(config, optimizer, head_variables(keras_model))
        keras_model.optimizer.build(keras_model.main_optimizer_variables())


# -------------------------------------------------------------------------------------------
# Fit loop

def _seed(config) -> int | None:
    return None if config.SEED is None else int(config.SEED)


def _datasets(model, train_dataset, val_dataset, augmentation, no_augmentation_sources):
    """Training and validation input; with several workers each feeds its share of every global batch."""
    config = model.config
    seed = _seed(config)
    cluster = multiworker.active_cluster()
    workers = 1 if cluster is None else cluster.size
    start = model.epoch * config.STEPS_PER_EPOCH * config.BATCH_SIZE * workers

    def build(dataset, **options):
        if cluster is None:
            return make_dataset(dataset, config, **options)
        # Each worker's pipeline yields per-replica batches (IMAGES_PER_GPU); its local replicas take
        # consecutive ones, so one step covers this worker's BATCH_SIZE slice of the global batch.
        return model.keras_model.distribute_strategy.distribute_datasets_from_function(
            lambda context: make_dataset(dataset, config, batch_size=config.IMAGES_PER_GPU,
                                         shard=(config.BATCH_SIZE, workers, cluster.rank), **options))

    train_ds = build(train_dataset, shuffle=True, augmentation=augmentation,
                     no_augmentation_sources=no_augmentation_sources, seed=seed, start=start, balanced=True)
    val_ds = None
    if val_dataset is not None and config.VALIDATION_STEPS:
        val_ds = build(val_dataset, shuffle=True, seed=None if seed is None else seed + 1)
    return train_ds, val_ds


def _callbacks(model, custom_callbacks, guard: NonFiniteGuard, layers: str) -> list:
    """The guard, logs and checkpoints (and the optimiser state of a stage training ``layers``);
    a non-chief worker of a multi-worker run writes nothing."""
    if not multiworker.is_chief():
        return [guard, EpochCheckpoint(model, guard, write=False), *(custom_callbacks or [])]
    return [guard,
            SafeCSVLogger(os.path.join(model.log_dir, "training.csv"), first_epoch=model.epoch, guard=guard),
            ScalarSummaries(model.log_dir),
            EpochCheckpoint(model, guard, save_optimizer=model.config.SAVE_OPTIMIZER_STATE, layers=layers),
            *(custom_callbacks or [])]


def interrupted_message(model, epochs: int) -> str:
    """What a Ctrl-C during :func:`train` kept, and how to resume (Python; lesions.py prints its own command)."""
    kept = (f"the checkpoints up to epoch {model.epoch} are kept in {model.log_dir}" if model.epoch
            else f"no epoch was complete, so {model.log_dir} has no checkpoint")
    return (f"Training interrupted during epoch {model.epoch + 1}; {kept}.\n"
            f"To resume in Python: model.load_weights(model.find_last()), then model.train(...) with the same "
            f"arguments (epochs={epochs}); with lesions.py: the same command with --weights last.")


def train(model, train_dataset, val_dataset, learning_rate: float, epochs: int, layers: str,
          augmentation: Any = None, custom_callbacks: list | None = None,
          no_augmentation_sources: list[str] | None = None, verbose: int = 1, *, list_layers: bool = True):
    """Train ``model`` (a MaskRCNN in training mode) from ``model.epoch`` up to epoch ``epochs``.

    ``layers``: "heads", "3+", "4+", "5+", "all" or a regex full-matched on layer names; with
    ``list_layers`` the trainable layers are listed first, as Matterport's ``train`` does
    (:func:`set_trainable` with verbose 1). ``verbose``: Keras' progress output.
    ``augmentation``: an albumentations transform (see mrcnn.augmentation.default_augmentation) or None.
    Writes into ``model.log_dir``: config.json, training.csv (5 losses + val_ losses per epoch),
    TensorBoard scalars, and ``mask_rcnn_<name>_NNNN.h5`` after every epoch (atomic), with the
    optimisers' state before it in ``optimizer_<name>_NNNN.h5`` (SAVE_OPTIMIZER_STATE). Starting at
    a checkpoint's epoch (``model.epoch`` > 0) in the stage that wrote it, the optimisers go on with
    that state; otherwise a line says why they start fresh (:func:`mrcnn.optimizer_state.resume`).
    Raises TrainingDivergedError (last good checkpoint kept) if a loss becomes NaN/Inf;
    re-raises KeyboardInterrupt after saying how to resume (:func:`interrupted_message`; a Ctrl-C
    during a checkpoint write first finishes that file). Returns the Keras History.
    """
    if model.mode != "training":
        raise ValueError("train needs a model created in 'training' mode")
    check_augmentation(augmentation)
    try:
        history, guard = run_interruptible(lambda: _fit(
            model, train_dataset, val_dataset, learning_rate, epochs, layers, augmentation, custom_callbacks,
            no_augmentation_sources, verbose, list_layers))
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(model, epochs)}", flush=True)
        raise
    if guard.diverged:
        raise TrainingDivergedError(guard.message + f"; last good checkpoint kept in {model.log_dir}")
    model.epoch = max(model.epoch, epochs)
    return history


@contextlib.contextmanager
def _noting_sigint():
    """Within: a Ctrl-C (SIGINT) acts as before (KeyboardInterrupt, or nothing where ignored) and is
    noted in the yielded dict (``"seen"``). Main thread only; elsewhere nothing is noted."""
    noted = {"seen": False}
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        noted["seen"] = True
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def run_interruptible(call: Callable[[], Any]) -> Any:
    """``call()``; a Ctrl-C during it ends as KeyboardInterrupt even where TensorFlow's C++ code
    turned the interrupt into another error on its way out (seen: SystemError "bad argument to
    internal function" from a Keras train step)."""
    with _noting_sigint() as noted:
        try:
            return call()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if noted["seen"]:
                raise KeyboardInterrupt from exc
            raise


def _fit(model, train_dataset, val_dataset, learning_rate, epochs, layers, augmentation, custom_callbacks,
         no_augmentation_sources, verbose, list_layers=True):
    """The body of :func:`train` (set up, then Keras fit); returns (history, guard)."""
    config = model.config
    if _seed(config) is not None:
        keras.utils.set_random_seed(_seed(config) + model.epoch)
    if multiworker.is_chief():
        os.makedirs(model.log_dir, exist_ok=True)
        config.save(os.path.join(model.log_dir, "config.json"))
    train_ds, val_ds = _datasets(model, train_dataset, val_dataset, augmentation, no_augmentation_sources)
    print(f"\nStarting at epoch {model.epoch}. LR={learning_rate}\nCheckpoint Path: {model.checkpoint_path}")
    names = set_trainable(model, layers, verbose=1 if list_layers else 0)
    logger.info("Starting at epoch %d, lr=%s, %d trainable layers; checkpoints: %s",
                model.epoch, learning_rate, len(names), model.checkpoint_path)
    compile_training_model(model.keras_model, learning_rate, config)
    line = optimizer_state.resume(model, layers)  # restored from the checkpoint's epoch, or why not
    if line:
        print(line, flush=True)
    cluster = multiworker.active_cluster()
    if cluster is not None:
        multiworker.check_same_start(model.keras_model.distribute_strategy, cluster, model.epoch,
                                     model.keras_model.get_weights(), optimizer_state.state_arrays(model.keras_model))
    guard = NonFiniteGuard(config.STEPS_PER_EPOCH)
    with _peer_failures(model):
        history = model.keras_model.fit(
            train_ds, initial_epoch=model.epoch, epochs=epochs, steps_per_epoch=config.STEPS_PER_EPOCH,
            validation_data=val_ds, validation_steps=config.VALIDATION_STEPS if val_ds is not None else None,
            callbacks=_callbacks(model, custom_callbacks, guard, layers), verbose=verbose, shuffle=False)
    return history, guard


#: What a collective raises when a peer worker died or stopped answering.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                 tf.errors.AbortedError)


@contextlib.contextmanager
def _peer_failures(model):
    """In a multi-worker run: a collective failure -> WorkerLostError (one line, names the lost worker)."""
    cluster = multiworker.active_cluster()
    if cluster is None:
        yield
        return
    try:
        yield
    except PEER_FAILURES as exc:
        kept = f"the chief keeps its checkpoints up to epoch {model.epoch}" if model.epoch else "no epoch was complete"
        raise multiworker.lost_worker_error(exc, cluster, f"during epoch {model.epoch + 1} ({kept})") from exc
