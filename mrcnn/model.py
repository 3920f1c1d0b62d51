"""``MaskRCNN``: Matterport's model class (build, detect, weights, log dirs, train).

This module orchestrates; the graph pieces live in backbone.py, rpn.py, roi_align.py, heads.py,
detection.py and inference_graph.py, weight files in weights.py, result unmolding in
postprocess.py, training in training.py. Matterport's module-level names that users import from
``mrcnn.model`` are re-exported at the bottom.
"""

from __future__ import annotations

import collections
import datetime
import errno
import os
import re
from typing import Any, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from mrcnn import checkpoints
from mrcnn import weights as weights_io
from mrcnn.boxes import compute_backbone_shapes, generate_pyramid_anchors, norm_boxes
from mrcnn.config import diagnoses
from mrcnn.imaging import compose_image_meta, mold_image, resize_image, to_rgb
from mrcnn.inference_graph import build_inference_model
from mrcnn.postprocess import unmold_detections


class MaskRCNN:
    """Mask R-CNN with Matterport's interface.

    ``mode`` is "training" or "inference"; ``keras_model`` is the underlying Keras 3 model.
    """

    def __init__(self, mode: str, config: Any, model_dir: str) -> None:
        if mode not in ("training", "inference"):
            raise ValueError(f"mode must be 'training' or 'inference', got {mode!r}")
        self.mode = mode
        self.config = config
        self.model_dir = str(model_dir)
        self.epoch = 0
        self.anchors: np.ndarray | None = None
        self._anchor_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._detect_fns: dict[tuple[int, int] | None, Any] = {}
        self.set_log_dir()
        self.keras_model = self.build(mode, config)

    # -----------------------------------------------------------------------------------------
    # Graph

    def build(self, mode: str, config: Any) -> keras.Model:
        """Build the Keras model for ``mode``."""
        if mode == "training":
            from mrcnn.training import build_training_model  # lazy: training pulls in more modules
            return build_training_model(config)
        return build_inference_model(config)

    def get_anchors(self, image_shape: Sequence[int]) -> np.ndarray:
        """Normalised pyramid anchors [A, 4] (y1, x1, y2, x2) for a molded image shape, cached.

        The pixel-space anchors of the last call are kept in ``self.anchors``.
        """
        key = tuple(int(s) for s in image_shape[:2])
        if key not in self._anchor_cache:
            cfg = self.config
            pixel = generate_pyramid_anchors(cfg.RPN_ANCHOR_SCALES, cfg.RPN_ANCHOR_RATIOS,
                                             compute_backbone_shapes(cfg, key), cfg.BACKBONE_STRIDES,
                                             cfg.RPN_ANCHOR_STRIDE)
            self._anchor_cache[key] = (pixel, norm_boxes(pixel, key))
        self.anchors, normalised = self._anchor_cache[key]
        return normalised

    def get_trainable_layers(self) -> list[keras.layers.Layer]:
        """Top-level layers that own weights (the RPN sub-model counts as one)."""
        return [layer for layer in self.keras_model.layers if layer.weights]

    def find_trainable_layer(self, layer: keras.layers.Layer) -> keras.layers.Layer:
        """The layer itself (no TimeDistributed wrappers here; kept for Matterport compatibility)."""
        return getattr(layer, "layer", layer)

    # -----------------------------------------------------------------------------------------
    # Inference

    def mold_inputs(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images [H, W, C] -> (molded float32 [N, h, w, C], image_metas [N, META], windows int [N, 4])."""
        cfg = self.config
        molded, metas, windows = [], [], []
        for image in images:
            resized, window, scale, _, _ = resize_image(image, min_dim=cfg.IMAGE_MIN_DIM,
                                                        min_scale=cfg.IMAGE_MIN_SCALE,
                                                        max_dim=cfg.IMAGE_MAX_DIM, mode=cfg.IMAGE_RESIZE_MODE)
            molded.append(mold_image(resized, cfg))
            metas.append(compose_image_meta(0, image.shape, resized.shape, window, scale,
                                            np.zeros([cfg.NUM_CLASSES], dtype=np.int32)))
            windows.append(window)
        shapes = {m.shape for m in molded}
        if len(shapes) > 1:
            raise ValueError(f"images of one batch must mold to the same shape, got {sorted(shapes)} "
                             f"(IMAGE_RESIZE_MODE {cfg.IMAGE_RESIZE_MODE!r}; 'square' always gives one shape)")
        return np.stack(molded).astype(np.float32), np.stack(metas), np.array(windows)

    def _model_image(self, image: np.ndarray) -> np.ndarray:
        """Bring any in-memory image to the channel count the model expects."""
        channels = int(self.config.IMAGE_CHANNEL_COUNT)
        if channels == 3:
            return to_rgb(image)
        image = np.asarray(image)
        if image.ndim == 2 and channels == 1:
            image = image[..., np.newaxis]
        if image.ndim != 3 or image.shape[-1] != channels:
            raise ValueError(f"expected images with {channels} channels (IMAGE_CHANNEL_COUNT), got shape {image.shape}")
        return image

    def _check_batch(self, count: int, exact_batch: bool) -> None:
        if self.mode != "inference":
            raise ValueError("detect needs a model created in 'inference' mode")
        if exact_batch and count != self.config.BATCH_SIZE:
            raise ValueError(f"detect got {count} images but the model was built for BATCH_SIZE = "
                             f"{self.config.BATCH_SIZE} (IMAGES_PER_GPU x GPU_COUNT); pass exactly that many"
                             " (or leave out exact_batch=True: any count is batched and padded)")

    def _detect_function(self, molded_shape: Sequence[int] | None = None) -> Any:
        """The compiled tf.function for a molded batch of ``molded_shape`` [B, h, w, C].

        Batches of the configured IMAGE_SHAPE (always the case in "square" resize mode) run a
        graph traced once with that static shape; any other size shares one graph of unknown
        height and width (traced once too). Static shapes let TF plan the convolutions for the
        real sizes (measured 3-9% faster at 512 px on this CPU).
        """
        cfg = self.config
        batch, channels = cfg.BATCH_SIZE, int(cfg.IMAGE_CHANNEL_COUNT)
        configured = tuple(int(s) for s in cfg.IMAGE_SHAPE[:2])
        hw = configured if molded_shape is None or tuple(int(s) for s in molded_shape[1:3]) == configured else None
        if hw not in self._detect_fns:
            anchor_count = len(self.get_anchors(hw)) if hw is not None else None
            signature = [tf.TensorSpec((batch, *(hw or (None, None)), channels), tf.float32),
                         tf.TensorSpec((batch, int(cfg.IMAGE_META_SIZE)), tf.float32),
                         tf.TensorSpec((batch, anchor_count, 4), tf.float32)]

            diagnosing = diagnoses(cfg)

            def forward(images: tf.Tensor, metas: tf.Tensor, anchors: tf.Tensor) -> tuple[tf.Tensor, ...]:
                outputs = self.keras_model([images, metas, anchors], training=False)
                if diagnosing:  # detections, mrcnn_mask, class_probs (the last output)
                    return outputs[0], outputs[3], outputs[-1]
                return outputs[0], outputs[3]  # detections, mrcnn_mask

            self._detect_fns[hw] = tf.function(forward, input_signature=signature)
        return self._detect_fns[hw]

    @property
    def detect_trace_count(self) -> int:
        """How many times detect graphs were traced: 1 after any number of same-batch calls on
        images of one molded size (2 if both the configured size and other sizes were seen)."""
        return sum(int(fn.experimental_get_tracing_count()) for fn in self._detect_fns.values())

    def batch_anchors(self, molded: np.ndarray) -> np.ndarray:
        """Normalised anchors (y1, x1, y2, x2) broadcast to a molded batch [B, h, w, 3]: [B, A, 4]
        (the third input of the inference graph; see :meth:`get_anchors`)."""
        anchors = self.get_anchors(molded.shape[1:3])
        return np.broadcast_to(anchors, (molded.shape[0],) + anchors.shape)

    def _run(self, molded: np.ndarray, metas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Molded batch -> (detections [B, D, 6], mrcnn_mask [B, D, mh, mw, C], class_probs [B, K]
        or None for a model that does not diagnose) as numpy."""
        anchors = self.batch_anchors(molded)
        outputs = self._detect_function(molded.shape)(
            tf.constant(molded, tf.float32), tf.constant(metas, tf.float32), tf.constant(anchors, tf.float32))
        class_probs = outputs[2].numpy() if len(outputs) > 2 else None
        return outputs[0].numpy(), outputs[1].numpy(), class_probs

    def _run_padded(self, molded: np.ndarray, metas: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Like :meth:`_run` for 1..BATCH_SIZE images of one molded shape [n, h, w, C].

        A short batch is padded to BATCH_SIZE with copies of its last image (each image is
        computed on its own in inference, so the padding changes no result), so every count runs
        the one graph traced for BATCH_SIZE; the padding's outputs are dropped.
        """
        count, missing = len(molded), self.config.BATCH_SIZE - len(molded)
        if missing > 0:
            molded = np.concatenate([molded, np.repeat(molded[-1:], missing, axis=0)])
            metas = np.concatenate([metas, np.repeat(metas[-1:], missing, axis=0)])
        detections, masks, class_probs = self._run(molded, metas)
        return detections[:count], masks[:count], None if class_probs is None else class_probs[:count]

    def detect(self, images: Sequence[np.ndarray], verbose: int = 0, *,
               exact_batch: bool = False) -> list[dict[str, np.ndarray]]:
        """Detect instances in any number of images (any size; gray/RGBA/uint16 converted to RGB).

        Returns one dict per image, in order: rois int32 [N, 4] (y1, x1, y2, x2, original pixels,
        y2/x2 exclusive), class_ids int32 [N], scores float32 [N], masks bool [H, W, N]; by score.
        A diagnosing model (two or more ``config.CLASSES``, :mod:`mrcnn.diagnosis`) adds
        ``class_probs`` float32 [K]: the image's probability of each of CLASSES (sum 1).

        The images run BATCH_SIZE (IMAGES_PER_GPU x GPU_COUNT) at a time, molded one batch at a
        time (memory stays that of one batch); the last batch is padded to BATCH_SIZE, so any
        count uses the same traced graph and 0 images give ``[]``. In resize modes other than
        "square" the images of one batch may mold to different shapes: each shape then runs as its
        own (padded) batch. ``exact_batch=True`` keeps Matterport's rule: anything but exactly
        BATCH_SIZE images is a ValueError.
        """
        self._check_batch(len(images), exact_batch)
        if verbose:
            log(f"Processing {len(images)} images")
        results: list[dict[str, np.ndarray]] = []
        batch = self.config.BATCH_SIZE
        for start in range(0, len(images), batch):
            chunk = [self._model_image(image) for image in images[start:start + batch]]
            results.extend(self._detect_chunk(chunk, verbose))
        return results

    def _detect_chunk(self, images: list[np.ndarray], verbose: int) -> list[dict[str, np.ndarray]]:
        """Detect in up to BATCH_SIZE model-ready images, one padded run per molded shape."""
        molded_one = [self.mold_inputs([image]) for image in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (molded, _, _) in enumerate(molded_one):
            by_shape.setdefault(molded.shape[1:], []).append(i)
        results: list[Any] = [None] * len(images)
        for indices in by_shape.values():
            molded = np.concatenate([molded_one[i][0] for i in indices])
            metas = np.concatenate([molded_one[i][1] for i in indices])
            if verbose:
                for i in indices:
                    log("image", images[i])
                log("molded_images", molded)
                log("image_metas", metas)
            detections, masks, class_probs = self._run_padded(molded, metas)
            for row, i in enumerate(indices):
                results[i] = self._result(detections[row], masks[row], images[i].shape, molded[row].shape,
                                          molded_one[i][2][0], None if class_probs is None else class_probs[row])
        return results

    def detect_molded(self, molded_images: np.ndarray, image_metas: np.ndarray,
                      verbose: int = 0, *, exact_batch: bool = False) -> list[dict[str, np.ndarray]]:
        """Detect on already molded images [N, h, w, C] (any N, batched and padded as in
        :meth:`detect`); results are in molded-image pixels."""
        self._check_batch(len(molded_images), exact_batch)
        molded = np.asarray(molded_images, dtype=np.float32)
        metas = np.asarray(image_metas)
        h, w = molded.shape[1:3]
        results = []
        for start in range(0, len(molded), self.config.BATCH_SIZE):
            stop = start + self.config.BATCH_SIZE
            detections, masks, class_probs = self._run_padded(molded[start:stop], metas[start:stop])
            results.extend(self._result(detections[i], masks[i], molded[start + i].shape, molded[start + i].shape,
                                        (0, 0, h, w), None if class_probs is None else class_probs[i])
                           for i in range(len(detections)))
        return results

    def _result(self, detections: np.ndarray, masks: np.ndarray, original_shape: Sequence[int],
                molded_shape: Sequence[int], window: Sequence[int],
                class_probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
        rois, class_ids, scores, full_masks = unmold_detections(detections, masks, original_shape, molded_shape,
                                                                window, self.config.DETECTION_MASK_THRESHOLD)
        result = {"rois": rois, "class_ids": class_ids, "scores": scores, "masks": full_masks}
        if class_probs is not None:
            result["class_probs"] = np.asarray(class_probs, dtype=np.float32)
        return result

    def unmold_detections(self, detections: np.ndarray, mrcnn_mask: np.ndarray, original_image_shape: Sequence[int],
                          image_shape: Sequence[int], window: Sequence[int]) -> tuple[np.ndarray, ...]:
        """Matterport's method: see :func:`mrcnn.postprocess.unmold_detections`."""
        return unmold_detections(detections, mrcnn_mask, original_image_shape, image_shape, window,
                                 self.config.DETECTION_MASK_THRESHOLD)

    def run_graph(self, images: Sequence[np.ndarray], outputs: Sequence[tuple[str, Any]],
                  image_metas: np.ndarray | None = None, *, verbose: int = 1) -> dict[str, np.ndarray]:
        """Evaluate named symbolic tensors of the inference model ``[(name, tensor)]`` (debugging).

        Without ``image_metas`` the images are molded first (:meth:`mold_inputs`); with
        ``image_metas`` they are taken as already molded (resized, padded, mean subtracted), as in
        Matterport. Returns {name: numpy array} in the given order and, with ``verbose``, logs each
        (name, shape, min, max, dtype) as Matterport does.
        """
        if any(tensor is None for _, tensor in outputs):
            missing = [name for name, tensor in outputs if tensor is None]
            raise ValueError(f"run_graph: no tensor for {', '.join(missing)} (an ancestor() that found nothing?)")
        if image_metas is None:
            molded, metas, _ = self.mold_inputs([self._model_image(im) for im in images])
        else:
            molded, metas = np.asarray(images, dtype=np.float32), np.asarray(image_metas)
        anchors = self.batch_anchors(molded)
        probe = keras.Model(self.keras_model.inputs, [t for _, t in outputs])
        values = probe([molded, metas.astype(np.float32), anchors.astype(np.float32)], training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        results = {name: keras.ops.convert_to_numpy(v) for (name, _), v in zip(outputs, values, strict=True)}
        if verbose:
            for name, value in results.items():
                log(name, value)
        return results

    def ancestor(self, tensor: Any, name: str | re.Pattern, checked: list | None = None) -> Any:
        """The nearest ancestor of the symbolic ``tensor`` in the Keras graph named ``name``, or None.

        Keras 3 keeps each symbolic tensor's history (the layer that produced it, that layer's
        input tensors), so the search walks back through layer calls, nearest first. A tensor's
        names are its layer's name and ``<layer>:<output index>`` (``"rpn_class"``,
        ``"proposal_targets:1"``); ``name`` (a string or compiled pattern) must match one of them
        entirely. Matterport's Keras 2 graph also held the TF ops inside a layer (e.g.
        ``"ROI/refined_anchors:0"``); Keras 3 records layer calls only, so such names give None,
        as do the layers inside a nested model (``rpn_model``). ``checked``: tensors to skip
        (visited tensors are appended to it).
        """
        pattern = re.compile(name) if isinstance(name, str) else name
        if getattr(tensor, "_keras_history", None) is None:
            raise TypeError(f"ancestor() needs a symbolic Keras tensor (e.g. keras_model.get_layer(...).output), "
                            f"got {type(tensor).__name__}")
        seen = {id(t) for t in checked} if checked is not None else set()
        queue = collections.deque(_parent_tensors(tensor))
        while queue:
            parent = queue.popleft()
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            if checked is not None:
                checked.append(parent)
            operation, _, index = parent._keras_history  # noqa: SLF001 (Keras' public-by-convention history)
            if any(pattern.fullmatch(n) for n in (operation.name, f"{operation.name}:{index}")):
                return parent
            queue.extend(_parent_tensors(parent))
        return None

    # -----------------------------------------------------------------------------------------
    # Weights and log dirs

    def load_weights(self, filepath: str, by_name: bool = False, exclude: Iterable[str] | None = None,
                     strict: bool = False, verbose: int = 1) -> weights_io.LoadReport:
        """Load a Keras-2 HDF5 weight file by layer name (see :func:`mrcnn.weights.load_hdf5_weights`),
        then :meth:`set_log_dir` from its path (resumes epoch numbering of our checkpoints)."""
        report = weights_io.load_hdf5_weights(self.keras_model, str(filepath), by_name=by_name,
                                              exclude=exclude, strict=strict, verbose=verbose)
        self.set_log_dir(str(filepath))
        return report

    def save_weights(self, filepath: str) -> None:
        """Write the weights in the Keras-2 layout (loadable by load_weights and by Matterport)."""
        weights_io.save_hdf5_weights(self.keras_model, str(filepath))

    def set_log_dir(self, model_path: str | None = None) -> None:
        """Set ``log_dir``, ``checkpoint_path`` and ``epoch``: a fresh timestamped run, or, for a
        path like ``.../<name>YYYYMMDDTHHMM/mask_rcnn_<name>_NNNN.h5``, that run at epoch NNNN
        (see :mod:`mrcnn.checkpoints`). A training model says where it re-starts, as Matterport's."""
        self.epoch = 0
        now = datetime.datetime.now()
        parsed = checkpoints.parse_checkpoint_path(model_path) if model_path else None
        if parsed is not None:
            now, self.epoch = parsed
            if self.mode == "training":
                print(f"Re-starting from epoch {self.epoch}")
        self.log_dir = os.path.join(self.model_dir, checkpoints.run_folder_name(self.config.NAME, now))
        self.checkpoint_path = os.path.join(self.log_dir, checkpoints.checkpoint_template(self.config.NAME))

    def get_imagenet_weights(self) -> str:
        """Path of the ResNet-50 ImageNet weights (``weights/``), downloaded and verified when missing
        (Matterport's method; :func:`mrcnn.downloads.fetch_weights`)."""
        from mrcnn.downloads import IMAGENET_RESNET50, fetch_weights

        return str(fetch_weights(IMAGENET_RESNET50))

    def find_last(self) -> str:
        """Path of the last checkpoint of the newest run of this config's NAME in ``model_dir``."""
        found = checkpoints.newest_checkpoint(self.model_dir, self.config.NAME)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, f"Could not find a checkpoint of a '{str(self.config.NAME).lower()}'"
                                    " run in", self.model_dir)
        return str(found)

    # -----------------------------------------------------------------------------------------
    # Training (implemented in mrcnn.training)

    def train(self, train_dataset: Any, val_dataset: Any, learning_rate: float, epochs: int, layers: str,
              augmentation: Any = None, custom_callbacks: list | None = None,
              no_augmentation_sources: list | None = None, *, list_layers: bool = True) -> Any:
        """Train to the absolute epoch ``epochs``; see :func:`mrcnn.training.train`. Lists the
        trainable layers first, as Matterport's ``train`` does, unless ``list_layers`` is False."""
        if self.mode != "training":
            raise ValueError("train needs a model created in 'training' mode")
        from mrcnn.training import train
        return train(self, train_dataset, val_dataset, learning_rate, epochs, layers,
                     augmentation=augmentation, custom_callbacks=custom_callbacks,
                     no_augmentation_sources=no_augmentation_sources, list_layers=list_layers)

    def set_trainable(self, layer_regex: str, keras_model: Any = None, indent: int = 0,
                      verbose: int = 1) -> list[str]:
        """Make trainable exactly the weighted layers whose names fully match ``layer_regex`` (or a
        preset: "heads", "3+", "4+", "5+", "all"), in ``keras_model`` (default: this model's).
        With ``verbose`` > 0 it prints, as Matterport, "Selecting layers to train" and one line per
        trainable layer (name and class, nested models indented). Returns the trainable layers' names
        (Matterport returns None); see mrcnn.training.set_trainable."""
        from mrcnn.training import set_trainable
        return set_trainable(self if keras_model is None else keras_model, layer_regex, verbose=verbose, indent=indent)


# ---------------------------------------------------------------------------------------------
# Matterport module-level names importable from mrcnn.model

from mrcnn.backbone import BatchNorm, build_fpn, conv_block, identity_block, resnet_graph  # noqa: E402,F401
from mrcnn.detection import DetectionLayer  # noqa: E402,F401
from mrcnn.heads import build_fpn_mask_graph, fpn_classifier_graph  # noqa: E402,F401
from mrcnn.imaging import parse_image_meta, parse_image_meta_graph, unmold_image  # noqa: E402,F401
from mrcnn.roi_align import PyramidROIAlign  # noqa: E402,F401
from mrcnn.rpn import ProposalLayer, build_rpn_model  # noqa: E402,F401
from mrcnn.tf_boxes import (  # noqa: E402,F401
    apply_box_deltas_graph,
    clip_boxes_graph,
    denorm_boxes_graph,
    norm_boxes_graph,
    overlaps_graph,
    trim_zeros_graph,
)
from mrcnn.weights import WeightsError  # noqa: E402,F401

# >>> Training-side re-exports (owned by the training engineer): name -> module, imported lazily
# so that importing mrcnn.model stays light. Add data_generator, load_image_gt, ... here.
# A value is "module" (same name there) or "module:attribute" (Matterport name -> ours).
_LAZY_EXPORTS = {
    "data_generator": "mrcnn.input_pipeline",
    "load_image_gt": "mrcnn.input_pipeline",
    "build_rpn_targets": "mrcnn.targets",
    "generate_random_rois": "mrcnn.targets",
    "build_detection_targets": "mrcnn.targets",
    "DetectionTargetLayer": "mrcnn.targets",
    "detection_targets_graph": "mrcnn.targets",
    "rpn_class_loss_graph": "mrcnn.losses:rpn_class_loss",
    "rpn_bbox_loss_graph": "mrcnn.losses:rpn_bbox_loss",
    "mrcnn_class_loss_graph": "mrcnn.losses:mrcnn_class_loss",
    "mrcnn_bbox_loss_graph": "mrcnn.losses:mrcnn_bbox_loss",
    "mrcnn_mask_loss_graph": "mrcnn.losses:mrcnn_mask_loss",
    "smooth_l1_loss": "mrcnn.losses:smooth_l1",
}
# <<<


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        import importlib
        module, _, attribute = _LAZY_EXPORTS[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)
    raise AttributeError(f"module 'mrcnn.model' has no attribute {name!r}")


def _parent_tensors(tensor: Any) -> list:
    """The input tensors of the layer call that produced the symbolic ``tensor`` ([] for an Input)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return []
    operation, node_index, _ = history
    nodes = getattr(operation, "_inbound_nodes", [])
    return list(nodes[node_index].input_tensors) if node_index < len(nodes) else []


def log(text: str, array: np.ndarray | None = None) -> None:
    """Print ``text`` and, if given, the array's shape, min, max and dtype (Matterport's debug helper)."""
    if array is not None:
        array = np.asarray(array)
        text = f"{text:25s} shape: {str(array.shape):20s} "
        text += f"min: {array.min():10.5f}  max: {array.max():10.5f}" if array.size else "min: -  max: -"
        text += f"  {array.dtype}"
    print(text)
