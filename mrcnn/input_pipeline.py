"""Training input: load + resize + augment one image (``load_image_gt``), build its RPN targets,
pad to fixed shapes, and feed batches through a parallel, deterministic ``tf.data`` pipeline.

Augmentation uses **albumentations** by default: ``augmentation=`` takes an albumentations
transform (a ``Compose`` or a single transform) applied to the image and, identically, to every
instance mask. An **imgaug** augmenter (Matterport's choice; imgaug 0.4 does not import on NumPy 2,
a NumPy-2 fork that installs the ``imgaug`` module does, see requirements-matterport.txt) is
accepted too: the masks go only through its geometric augmenters (see :func:`augment_imgaug`).
Shape-changing transforms are refused (the training graph needs IMAGE_SHAPE).

Per-sample randomness (shuffling, augmentation, RPN subsampling) is drawn from
``numpy.random.default_rng([seed, sample_index])`` so a run is reproducible for a given
``config.SEED`` whatever the thread scheduling.

One training sample (before batching) is a dict of numpy arrays:
``input_image`` float32 [H, W, 3] (molded), ``input_image_meta`` float32 [META],
``input_rpn_match`` int32 [A, 1], ``input_rpn_bbox`` float32 [RPN_TRAIN_ANCHORS_PER_IMAGE, 4],
``input_gt_class_ids`` int32 [MAX_GT], ``input_gt_boxes`` float32 [MAX_GT, 4] (pixels, y1, x1,
y2, x2), ``input_gt_masks`` bool [mh, mw, MAX_GT] (mini masks) or [H, W, MAX_GT]; rows beyond
the image's instance count are zero. A model with the image-level diagnosis head also gets
``input_gt_diagnosis`` int32 [] (index of the image's diagnosis in CLASSES, -1 = none;
:func:`input_names`).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from mrcnn.augmentation import default_augmentation, seed_transform  # noqa: F401  (default_augmentation: its home before)
from mrcnn.boxes import compute_backbone_shapes, extract_bboxes, generate_pyramid_anchors
from mrcnn.diagnosis import DIAGNOSIS_INPUT, diagnosis_index, sampling_probabilities, uses_image_head
from mrcnn.imaging import compose_image_meta, minimize_mask, mold_image
from mrcnn.preprocess_cache import resize_sample
from mrcnn.targets import build_rpn_targets

logger = logging.getLogger(__name__)

#: Order of the training model's inputs (Matterport §4.1).
INPUT_NAMES = ("input_image", "input_image_meta", "input_rpn_match", "input_rpn_bbox",
               "input_gt_class_ids", "input_gt_boxes", "input_gt_masks")


def input_names(config) -> tuple[str, ...]:
    """INPUT_NAMES, plus ``input_gt_diagnosis`` (int32 per image: index of its diagnosis in CLASSES,
    -1 = none) for a model with the image-level diagnosis head (mrcnn.diagnosis)."""
    return INPUT_NAMES + ((DIAGNOSIS_INPUT,) if uses_image_head(config) else ())
#: A data error is logged and the image skipped; after this many errors the pipeline fails.
MAX_DATA_ERRORS = 5


# -------------------------------------------------------------------------------------------
# Augmentation

def is_imgaug(augmentation: Any) -> bool:
    """True for an imgaug augmenter (from imgaug itself or a fork installing the ``imgaug`` module)."""
    meta = sys.modules.get("imgaug.augmenters.meta")  # not imported: the object cannot be one
    return meta is not None and isinstance(augmentation, meta.Augmenter)


def _is_albumentations(augmentation: Any) -> bool:
    """True for an albumentations transform or Compose."""
    import albumentations as A

    return isinstance(augmentation, (A.BaseCompose, A.BasicTransform))


def check_augmentation(augmentation: Any) -> None:
    """Raise TypeError (one line) unless ``augmentation`` is None, an albumentations transform or an
    imgaug augmenter; an imgaug pipeline that fails on a probe image raises ValueError."""
    if augmentation is None or _is_albumentations(augmentation):
        return
    if is_imgaug(augmentation):
        _probe_imgaug(augmentation)
        return
    kind = f"{type(augmentation).__module__}.{type(augmentation).__qualname__}"
    raise TypeError(f"augmentation= takes an albumentations transform (e.g. albumentations.Compose([...]) or "
                    f"mrcnn.augmentation.default_augmentation(seed)) or an imgaug augmenter, got {kind}")


#: Seeds of the probe run that checks an imgaug pipeline before training.
IMGAUG_PROBE_SEEDS = range(4)


def _probe_imgaug(augmentation: Any) -> None:
    """Run a copy of an imgaug pipeline on a small image and mask; ValueError (one line) if it fails.

    Some augmenters of the imgaug forks fail under NumPy 2 (Crop, CropAndPad, Pad raise
    ``TypeError: only 0-dimensional arrays ...``); this says so before training starts, not after
    the first images were skipped.
    """
    image = np.full((32, 32, 3), 128, np.uint8)
    masks = np.zeros((32, 32, 1), bool)
    masks[8:24, 8:24] = True
    probe = augmentation.deepcopy()
    for seed in IMGAUG_PROBE_SEEDS:
        try:
            new_image, new_masks = augment_imgaug(probe, image, masks, seed)
        except Exception as exc:  # noqa: BLE001 - reported as one line, with the cause chained
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise ValueError(f"augmentation= the imgaug pipeline fails on a test image ({reason}); some augmenters of "
                             "the imgaug forks (e.g. Crop, CropAndPad, Pad) fail on NumPy 2: use their "
                             "albumentations equivalents (README, 'Coming from Matterport')") from exc
        _check_same_shape(image, new_image, new_masks)


_AUGMENT_LOCK = threading.Lock()
#: Instance masks go through imgaug this many at a time (its segmentation maps are int32 copies).
IMGAUG_MASK_CHUNK = 16


def augment_imgaug(augmentation: Any, image: np.ndarray, masks: np.ndarray, seed: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Apply an imgaug augmenter to image [H, W, C] and, geometrically only, to bool masks [H, W, N].

    Like Matterport, one deterministic copy (``to_deterministic()``) augments the image and then the
    masks, so both see the same random draws. Matterport chose what touches the masks with a hook
    listing mask-safe augmenter class names; here the masks are imgaug segmentation maps, so imgaug
    itself applies only its geometric augmenters to them (flips, Affine, Crop, PiecewiseAffine, ...),
    with nearest-neighbour sampling and background 0, and skips the colour ones (Multiply, blur,
    noise). ``seed`` re-seeds the augmenter first, making the result reproducible.
    """
    from imgaug.augmentables.segmaps import SegmentationMapsOnImage

    with _AUGMENT_LOCK:  # seeding and to_deterministic() advance the shared augmenter's state
        if seed is not None:
            augmentation.seed_(int(seed))
        deterministic = augmentation.to_deterministic()
    new_image = deterministic(image=image)
    chunks = [deterministic(segmentation_maps=SegmentationMapsOnImage(masks[:, :, i:i + IMGAUG_MASK_CHUNK],
                                                                      shape=image.shape)).get_arr()
              for i in range(0, masks.shape[-1], IMGAUG_MASK_CHUNK)]
    new_masks = np.concatenate(chunks, axis=-1).astype(bool) if chunks else masks
    return new_image, new_masks


def augment_albumentations(augmentation: Any, image: np.ndarray, masks: np.ndarray, seed: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Apply one albumentations transform to image [H, W, C] and bool masks [H, W, N] alike."""
    kwargs: dict[str, Any] = {"image": image}
    if masks.shape[-1]:
        kwargs["masks"] = [masks[:, :, i].astype(np.uint8) for i in range(masks.shape[-1])]
    with _AUGMENT_LOCK:
        if seed is not None and hasattr(augmentation, "set_random_state"):
            seed_transform(augmentation, int(seed))
        out = augmentation(**kwargs)
    if masks.shape[-1]:
        return out["image"], np.stack([np.asarray(m) for m in out["masks"]], axis=-1).astype(bool)
    return out["image"], masks


def augment(augmentation: Any, image: np.ndarray, masks: np.ndarray, seed: int | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Apply an albumentations transform or an imgaug augmenter to image [H, W, C] and bool masks [H, W, N].

    ``seed`` re-seeds the transform first (thread-safe), making the result reproducible.
    Returns (image, masks bool [H, W, N]); raises ValueError if the transform changed the shape.
    """
    if is_imgaug(augmentation):  # (probed once by check_augmentation, when training starts)
        new_image, new_masks = augment_imgaug(augmentation, image, masks, seed)
    else:
        check_augmentation(augmentation)
        new_image, new_masks = augment_albumentations(augmentation, image, masks, seed)
    _check_same_shape(image, new_image, new_masks)
    return new_image, new_masks


def _check_same_shape(image: np.ndarray, new_image: np.ndarray, new_masks: np.ndarray) -> None:
    """ValueError unless the augmented image (and masks) kept the image's shape."""
    if new_image.shape != image.shape or new_masks.shape[:2] != image.shape[:2]:
        raise ValueError(f"augmentation changed the image shape {image.shape} -> {new_image.shape};"
                         " only shape-preserving transforms are allowed")


# -------------------------------------------------------------------------------------------
# One image

def active_class_ids(dataset, config, image_id: int) -> np.ndarray:
    """int32 [NUM_CLASSES]: 1 for every class of the image's source (background included)."""
    active = np.zeros([config.NUM_CLASSES], dtype=np.int32)
    source = dataset.image_info[image_id]["source"]
    active[dataset.source_class_ids[source]] = 1
    return active


_AUGMENT_FLAG_WARNED = False


def _check_augment_flag(augment: Any) -> bool:
    """Matterport's deprecated ``augment`` flag as a bool; TypeError for a transform passed there."""
    if augment is None or isinstance(augment, (bool, np.bool_)) or (isinstance(augment, (int, np.integer))
                                                                    and augment in (0, 1)):
        return bool(augment)
    raise TypeError(f"augment= is Matterport's deprecated flag (True: random left-right flip), got "
                    f"{type(augment).__name__}; pass a transform as augmentation= (load_image_gt(dataset, "
                    "config, image_id, augment=False, augmentation=None, use_mini_mask=False))")


def _random_fliplr(image: np.ndarray, mask: np.ndarray, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Matterport's deprecated ``augment=True``: flip image and masks left-right with probability 0.5."""
    global _AUGMENT_FLAG_WARNED
    if not _AUGMENT_FLAG_WARNED:
        logger.warning("'augment' is deprecated. Use 'augmentation' instead "
                       "(e.g. albumentations.HorizontalFlip(p=0.5)).")
        _AUGMENT_FLAG_WARNED = True
    rng = np.random.default_rng(None if seed is None else [int(seed), 1])
    if rng.integers(2):
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    return image, mask


def _apply_augmentation(augmentation: Any, image: np.ndarray, mask: np.ndarray, seed: int | None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`augment` (load_image_gt's ``augment`` argument, Matterport's flag, hides the name there)."""
    return augment(augmentation, image, mask, seed)


def load_image_gt(dataset, config, image_id: int, augment: bool = False, augmentation: Any = None,
                  use_mini_mask: bool = False, *, seed: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load, resize and (optionally) augment one image with its instances (Matterport §6.1).

    Matterport's signature and argument order. ``augment`` (deprecated, as in Matterport; use
    ``augmentation``) flips image and masks left-right with probability 0.5, before
    ``augmentation`` (an albumentations transform or an imgaug augmenter) runs.
    Returns (image uint8 [H, W, 3], image_meta float64 [12 + NUM_CLASSES], class_ids int32 [N],
    bbox int32 [N, 4] (y1, x1, y2, x2, y2/x2 exclusive), mask bool [H, W, N] or, with
    ``use_mini_mask``, [mh, mw, N] cropped to each box). Instances left empty by resizing or
    augmentation are dropped. ``seed`` (keyword-only, ours) makes the flip and the augmentation
    reproducible. With ``dataset.preprocess_cache`` set (a
    :class:`mrcnn.preprocess_cache.PreprocessCache`), the decoded and resized image and masks come
    from that cache; augmentation still runs after it.
    """
    flip = _check_augment_flag(augment)
    cache = getattr(dataset, "preprocess_cache", None)  # opt-in: mrcnn.preprocess_cache.PreprocessCache
    resized = cache.load(dataset, config, image_id) if cache is not None else resize_sample(dataset, config, image_id)
    image, mask, original_shape, window, scale = (resized.image, resized.mask, resized.original_shape,
                                                  resized.window, resized.scale)
    if flip:
        image, mask = _random_fliplr(image, mask, seed)
    if augmentation is not None:
        image, mask = _apply_augmentation(augmentation, image, mask, seed)
    keep = mask.any(axis=(0, 1))
    mask = mask[:, :, keep]
    class_ids = resized.class_ids[keep]
    bbox = extract_bboxes(mask).astype(np.int32).reshape(-1, 4)
    if use_mini_mask:
        mask = minimize_mask(bbox, mask, config.MINI_MASK_SHAPE)
    meta = compose_image_meta(image_id, original_shape, image.shape, window, scale,
                              active_class_ids(dataset, config, image_id))
    return image, meta, class_ids, bbox, mask


def get_training_anchors(config) -> np.ndarray:
    """Pixel anchors [A, 4] (y1, x1, y2, x2) for config.IMAGE_SHAPE, P2 first (float64)."""
    shapes = compute_backbone_shapes(config, config.IMAGE_SHAPE)
    return generate_pyramid_anchors(config.RPN_ANCHOR_SCALES, config.RPN_ANCHOR_RATIOS, shapes,
                                    config.BACKBONE_STRIDES, config.RPN_ANCHOR_STRIDE)


def _pad_instances(class_ids, boxes, masks, limit: int, rng: np.random.Generator):
    """Keep at most ``limit`` instances (random subset) and zero-pad to exactly ``limit``."""
    if len(class_ids) > limit:
        keep = np.sort(rng.choice(len(class_ids), limit, replace=False))
        class_ids, boxes, masks = class_ids[keep], boxes[keep], masks[:, :, keep]
    n = len(class_ids)
    padded_ids = np.zeros([limit], np.int32)
    padded_boxes = np.zeros([limit, 4], np.float32)
    padded_masks = np.zeros(masks.shape[:2] + (limit,), bool)
    padded_ids[:n], padded_boxes[:n], padded_masks[:, :, :n] = class_ids, boxes, masks
    return padded_ids, padded_boxes, padded_masks


def build_training_sample(dataset, config, image_id: int, anchors: np.ndarray, augmentation: Any = None,
                          rng: np.random.Generator | None = None, *, augment: bool = False, random_rois: int = 0,
                          detection_targets: bool = False) -> dict[str, np.ndarray]:
    """One padded training sample (see the module docstring for keys, shapes and dtypes).

    Matterport's data_generator options (off in training): ``augment`` (the deprecated random
    left-right flip); ``random_rois`` > 0 adds ``rpn_rois`` int32 [random_rois, 4] (pixels,
    :func:`mrcnn.targets.generate_random_rois`) and, with ``detection_targets``, ``rois``,
    ``mrcnn_class_ids``, ``mrcnn_bbox`` and ``mrcnn_mask`` (:func:`mrcnn.targets.build_detection_targets`).
    """
    rng = rng if rng is not None else np.random.default_rng()
    seed = int(rng.integers(2**31 - 1))
    image, meta, class_ids, boxes, masks = load_image_gt(dataset, config, image_id, augment, augmentation,
                                                         use_mini_mask=config.USE_MINI_MASK, seed=seed)
    if tuple(image.shape) != tuple(int(v) for v in config.IMAGE_SHAPE):
        raise ValueError(f"image {image_id} resized to {image.shape}, but training needs IMAGE_SHAPE"
                         f" {tuple(config.IMAGE_SHAPE)} (use IMAGE_RESIZE_MODE 'square' or 'crop')")
    gt_ids, gt_boxes, gt_masks = _pad_instances(class_ids, boxes, masks, config.MAX_GT_INSTANCES, rng)
    n = min(len(class_ids), config.MAX_GT_INSTANCES)
    rpn_match, rpn_bbox = build_rpn_targets(image.shape, anchors, gt_ids[:n], gt_boxes[:n], config, rng)
    sample = {
        "input_image": mold_image(image, config).astype(np.float32),
        "input_image_meta": meta.astype(np.float32),
        "input_rpn_match": rpn_match[:, None].astype(np.int32),
        "input_rpn_bbox": rpn_bbox.astype(np.float32),
        "input_gt_class_ids": gt_ids,
        "input_gt_boxes": gt_boxes,
        "input_gt_masks": gt_masks,
    }
    if uses_image_head(config):
        sample[DIAGNOSIS_INPUT] = np.int32(diagnosis_index(dataset.image_info[image_id], config))
    if random_rois:  # Matterport's debugging extras, from all instances (before the MAX_GT_INSTANCES cap)
        from mrcnn.targets import build_detection_targets, generate_random_rois

        sample["rpn_rois"] = generate_random_rois(image.shape, random_rois, class_ids, boxes, rng=rng)
        if detection_targets:
            names = ("rois", "mrcnn_class_ids", "mrcnn_bbox", "mrcnn_mask")
            sample |= dict(zip(names, build_detection_targets(sample["rpn_rois"], class_ids, boxes, masks, config,
                                                              rng=rng), strict=True))
    return sample


def sample_specs(config) -> dict[str, tf.TensorSpec]:
    """Fixed shapes and dtypes of one unbatched training sample."""
    h, w, c = (int(v) for v in config.IMAGE_SHAPE)
    m = config.MAX_GT_INSTANCES
    mask_hw = tuple(config.MINI_MASK_SHAPE) if config.USE_MINI_MASK else (h, w)
    a = len(get_training_anchors(config))
    extra = {DIAGNOSIS_INPUT: tf.TensorSpec([], tf.int32)} if uses_image_head(config) else {}
    return extra | {
        "input_image": tf.TensorSpec([h, w, c], tf.float32),
        "input_image_meta": tf.TensorSpec([config.IMAGE_META_SIZE], tf.float32),
        "input_rpn_match": tf.TensorSpec([a, 1], tf.int32),
        "input_rpn_bbox": tf.TensorSpec([config.RPN_TRAIN_ANCHORS_PER_IMAGE, 4], tf.float32),
        "input_gt_class_ids": tf.TensorSpec([m], tf.int32),
        "input_gt_boxes": tf.TensorSpec([m, 4], tf.float32),
        "input_gt_masks": tf.TensorSpec([*mask_hw, m], tf.bool),
    }


# -------------------------------------------------------------------------------------------
# Streams of samples

class SampleSource:
    """Deterministic sample number -> training sample (shuffled passes over the dataset).

    Sample ``i`` is image ``order(i // n)[i % n]`` where each pass has its own permutation drawn
    from ``seed``; its randomness comes from ``default_rng([seed, i])``. Failing images are logged
    and replaced by the next one; more than MAX_DATA_ERRORS failures raise.
    """

    def __init__(self, dataset, config, shuffle: bool = True, augmentation: Any = None,
                 no_augmentation_sources: list[str] | None = None, seed: int | None = None,
                 balanced: bool = False, **sample_options: Any) -> None:
        check_augmentation(augmentation)
        self.dataset, self.config, self.shuffle, self.augmentation = dataset, config, shuffle, augmentation
        self.sample_options = sample_options  # data_generator's extras: see build_training_sample
        self.no_augmentation_sources = set(no_augmentation_sources or ())
        self.seed = int(seed if seed is not None else np.random.SeedSequence().entropy % (2**31))
        self.anchors = get_training_anchors(config)
        self.image_ids = np.asarray(dataset.image_ids)
        if len(self.image_ids) == 0:
            raise ValueError("the dataset has no images (did you call prepare()?)")
        self.errors = 0
        self._orders: dict[int, np.ndarray] = {}
        #: With ``balanced`` (training) and CLASS_BALANCED_SAMPLING: each pass draws its images with
        #: these probabilities (with replacement) instead of a permutation.
        self.probabilities = sampling_probabilities(dataset, config) if balanced and shuffle else None

    def image_for(self, index: int) -> int:
        """Image id of sample number ``index``."""
        n = len(self.image_ids)
        epoch, pos = divmod(int(index), n)
        if not self.shuffle:
            return int(self.image_ids[pos])
        order = self._orders.get(epoch)  # one cached pass; worker threads may race, results stay equal
        if order is None:
            rng = np.random.default_rng([self.seed, 2**31 + epoch])
            if self.probabilities is None:
                order = rng.permutation(self.image_ids)
            else:
                order = rng.choice(self.image_ids, size=n, replace=True, p=self.probabilities)
            self._orders = {epoch: order}
        return int(order[pos])

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        for attempt in range(len(self.image_ids)):
            image_id = self.image_for(index + attempt)
            source = self.dataset.image_info[image_id]["source"]
            augmentation = None if source in self.no_augmentation_sources else self.augmentation
            try:
                return build_training_sample(self.dataset, self.config, image_id, self.anchors, augmentation,
                                             np.random.default_rng([self.seed, index]), **self.sample_options)
            except Exception:
                self.errors += 1
                logger.exception("error processing image %s (%s); skipping it",
                                 image_id, self.dataset.image_info[image_id].get("path"))
                if self.errors > MAX_DATA_ERRORS:
                    raise
        raise RuntimeError("no image of the dataset could be loaded")


def make_dataset(dataset, config, shuffle: bool = True, augmentation: Any = None,
                 no_augmentation_sources: list[str] | None = None, seed: int | None = None,
                 batch_size: int | None = None, start: int = 0, parallel: int | None = None,
                 shard: tuple[int, int, int] | None = None, balanced: bool = False) -> tf.data.Dataset:
    """Infinite tf.data pipeline of batched training inputs (dict keyed by INPUT_NAMES).

    Images are loaded, augmented and given RPN targets in parallel worker threads (``parallel``
    calls, default AUTOTUNE), in a deterministic order; batches of ``batch_size`` (default
    config.BATCH_SIZE) are prefetched. ``seed`` defaults to config.SEED; ``start`` skips samples
    (e.g. to resume). Every element has fixed shapes (see :func:`sample_specs`).
    ``shard`` = (share, workers, rank): only this worker's ``share`` samples of every global batch
    of ``share * workers`` (:func:`mrcnn.multiworker.shard_indices`; ``start`` counts global samples).
    ``balanced`` (the training set): draw images by CLASS_BALANCED_SAMPLING.
    """
    seed = config.SEED if seed is None else seed
    source = SampleSource(dataset, config, shuffle, augmentation, no_augmentation_sources, seed, balanced=balanced)
    specs = sample_specs(config)
    names = list(input_names(config))

    def load(index):
        sample = source(int(index))
        return [sample[name] for name in names]

    @tf.autograph.experimental.do_not_convert
    def load_tensor(index):
        values = tf.numpy_function(load, [index], [specs[n].dtype for n in names], stateful=False)
        return {n: tf.ensure_shape(v, specs[n].shape) for n, v in zip(names, values, strict=True)}

    calls = tf.data.AUTOTUNE if parallel is None else parallel
    if shard is None:
        ds = tf.data.Dataset.range(start, 2**62)
    else:
        from mrcnn.multiworker import shard_indices

        ds = tf.data.Dataset.range(0, 2**62).map(shard_indices(start, *shard))
    ds = ds.map(load_tensor, num_parallel_calls=calls, deterministic=True)
    ds = ds.batch(batch_size or config.BATCH_SIZE, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def data_generator(dataset, config, shuffle: bool = True, augment: bool = False, augmentation: Any = None,
                   random_rois: int = 0, batch_size: int = 1, detection_targets: bool = False,
                   no_augmentation_sources: list[str] | None = None, *, seed: int | None = None
                   ) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Matterport's infinite generator of ``(inputs, outputs)`` batches, with Matterport's arguments.

    inputs: [images float32 [B, H, W, 3] (molded), image_meta [B, META], rpn_match int32 [B, A, 1],
    rpn_bbox [B, RPN_TRAIN_ANCHORS_PER_IMAGE, 4], gt_class_ids int32 [B, MAX_GT], gt_boxes int32
    [B, MAX_GT, 4] (pixels), gt_masks bool [B, mh, mw, MAX_GT]]; outputs: []. With ``random_rois``
    > 0 the inputs also hold rpn_rois int32 [B, random_rois, 4] (random pixel boxes, mostly around
    the instances) and, with ``detection_targets``, rois int32 [B, TRAIN_ROIS_PER_IMAGE, 4], and
    outputs = [class_ids int32 [B, T, 1], bbox deltas float32 [B, T, NUM_CLASSES, 4], masks float32
    [B, T, MASK_H, MASK_W, NUM_CLASSES]], the heads' targets computed in numpy (as the
    inspect_*_data notebooks read them). ``augment``: Matterport's deprecated random left-right flip.
    ``seed`` (keyword-only, ours) makes the batches reproducible (default config.SEED).
    Unlike Matterport, images without instances are kept (they train the background; their
    random ROIs are all background). Training does not use this generator (see make_dataset).
    """
    source = SampleSource(dataset, config, shuffle, augmentation, no_augmentation_sources,
                          config.SEED if seed is None else seed, augment=_check_augment_flag(augment),
                          random_rois=int(random_rois or 0), detection_targets=bool(detection_targets))
    index = 0
    while True:
        samples = [source(index + b) for b in range(batch_size)]
        index += batch_size
        inputs = [np.stack([s[name] for s in samples]) for name in INPUT_NAMES]
        inputs[INPUT_NAMES.index("input_gt_boxes")] = inputs[INPUT_NAMES.index("input_gt_boxes")].astype(np.int32)
        outputs: list[np.ndarray] = []
        if random_rois:
            inputs.append(np.stack([s["rpn_rois"] for s in samples]))
            if detection_targets:
                inputs.append(np.stack([s["rois"] for s in samples]))
                outputs = [np.stack([s["mrcnn_class_ids"] for s in samples])[..., np.newaxis],
                           np.stack([s["mrcnn_bbox"] for s in samples]),
                           np.stack([s["mrcnn_mask"] for s in samples])]
        yield inputs, outputs
