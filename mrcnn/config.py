"""Mask R-CNN configuration, attribute-compatible with Matterport's ``mrcnn.config.Config``.

Users subclass :class:`Config` and override class attributes, exactly as with Matterport.
On top of that this module adds what a command-line tool needs:

* :meth:`Config.validate` refuses out-of-range or inconsistent values before any work starts
  (raises :class:`ConfigError` with a one-line message naming the key);
* :meth:`Config.apply_overrides` / :meth:`Config.from_toml` set values from ``KEY=VALUE``
  strings or TOML presets, refusing unknown keys and values of the wrong type;
* :meth:`Config.to_dict` gives a JSON/TOML-friendly snapshot (written into every log folder).
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mrcnn.errors import UserError
from mrcnn.fileio import json_safe, write_json_atomic

#: The names of COLOUR_CONSTANCY (what :func:`mrcnn.imaging.mold_image` does to the colours first).
COLOUR_CONSTANCIES = ("none", "shades_of_gray")


class ConfigError(UserError):
    """A configuration value is unknown, of the wrong type or out of range (one-line message)."""


#: Attributes that are computed in ``__init__`` and cannot be set directly.
DERIVED_KEYS = ("BATCH_SIZE", "IMAGE_SHAPE", "IMAGE_META_SIZE")

#: Attributes that may be a callable (so their type is not checked strictly).
CALLABLE_KEYS = ("BACKBONE", "COMPUTE_BACKBONE_SHAPE")

#: NAME names a folder and files: a plain name, no path separators, not "." or "..".
NAME_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.-]{1,64}$")

LOSS_NAMES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss", "mrcnn_mask_loss")


class Config:
    """Base configuration. Subclass and override the class attributes below."""

    # Experiment ----------------------------------------------------------------------------
    NAME: str | None = None
    GPU_COUNT = 1
    IMAGES_PER_GPU = 2
    STEPS_PER_EPOCH = 1000
    VALIDATION_STEPS = 50

    # Backbone and FPN ----------------------------------------------------------------------
    BACKBONE: Any = "resnet101"
    COMPUTE_BACKBONE_SHAPE = None
    BACKBONE_STRIDES = [4, 8, 16, 32, 64]
    FPN_CLASSIF_FC_LAYERS_SIZE = 1024
    TOP_DOWN_PYRAMID_SIZE = 256
    NUM_CLASSES = 1  # including background
    #: Names of the foreground classes, in class-id order (id 1 = CLASSES[0]). None (Matterport):
    #: set NUM_CLASSES yourself. A list makes NUM_CLASSES follow it (:func:`derived_num_classes`).
    #: Two or more names make the model diagnose: it names the image's class (``class_probs``).
    CLASSES: list[str] | None = None
    #: How a model with two or more CLASSES diagnoses (mrcnn/diagnosis.py): "roi" = Mask R-CNN's own
    #: class head over 1 + len(CLASSES) classes, the image's class from its detections; "image" = the
    #: detector keeps one class ("lesion", NUM_CLASSES = 2) and an extra image-level head on the
    #: backbone (global pooling of C5 and P2..P5, dense, dropout, dense) predicts CLASSES.
    DIAGNOSIS_HEAD = "roi"
    #: DIAGNOSIS_HEAD "roi" only: the class head also sees the whole image. The image's C5 and
    #: P2..P5, each averaged globally, concatenated and layer-normalised (the image head's pooling),
    #: join every ROI's shared features before ``mrcnn_class_logits`` (the box and mask branches are
    #: unchanged); the class loss then shapes the deep backbone stage too. False = Matterport.
    CLASS_HEAD_IMAGE_CONTEXT = False
    #: DIAGNOSIS_HEAD "roi" only: how the class head's probabilities over the proposals become the
    #: image's diagnosis. "mean": every proposal's foreground class probabilities (renormalised),
    #: averaged with its foreground probability 1 - P(background) as the weight; "top": those of the
    #: most lesion-like proposal alone. On ham10000_dx (2 x 3 AdamW models, same weights) "mean" gave
    #: +0.008 to +0.013 balanced accuracy over "top" in all six (benchmarks/README.md, session 11).
    DIAGNOSIS_ROI_POOLING = "mean"
    #: A crop-and-refine stage after the detector (the lesion toolkit's lesionkit.refine, whose
    #: REFINE_* keys live on lesions.LesionConfig). Declared here so that code handling any Config
    #: reads one default: a plain Mask R-CNN config never refines.
    REFINE = False
    #: Per-class weights of the diagnosis loss (the class head's loss with "roi", the image head's with
    #: "image"): "none", "balanced" (inverse class frequency of the training split, normalised to a
    #: frequency-weighted mean of 1, computed when training starts) or one positive number per CLASSES.
    CLASS_LOSS_WEIGHTS: Any = "none"
    #: Focal loss (Lin et al. 2017) on the diagnosis loss: cross-entropy times (1 - p_true)^gamma.
    #: 0 = plain cross-entropy.
    FOCAL_LOSS_GAMMA = 0.0
    #: Label smoothing of the diagnosis loss, 0..0.5: the true class's target is 1 - s, the rest s
    #: spread evenly over the K diagnoses (with "roi": lesion ROIs only, among the K diagnoses, so
    #: the lesion-vs-background target stays hard). 0 = one-hot targets.
    DIAGNOSIS_LABEL_SMOOTHING = 0.0
    #: Class-balanced sampling of the training images of a diagnosing model, 0..1: each training pass
    #: draws its images (with replacement) with probability proportional to n_class^-s, n_class =
    #: the number of training images of the image's diagnosis. 0 = every image once per pass (off),
    #: 1 = every diagnosis equally often, 0.5 = in between (square root).
    CLASS_BALANCED_SAMPLING = 0.0
    #: Weight of the image-level diagnosis loss (DIAGNOSIS_HEAD "image") in the total loss.
    DIAGNOSIS_LOSS_WEIGHT = 1.0
    #: Dropout rate before the image-level diagnosis head's last dense layer.
    DIAGNOSIS_DROPOUT = 0.3
    #: What updates the image-level diagnosis head's variables (the ``mrcnn_diagnosis*`` layers):
    #: "shared" = the model's SGD, as every other layer; "adamw" = their own Keras AdamW (learning
    #: rate DIAGNOSIS_LEARNING_RATE, decay DIAGNOSIS_WEIGHT_DECAY), every other variable keeps the
    #: SGD exactly (with GRADIENT_CLIP_MODE "global" the SGD's joint norm then leaves the head out;
    #: the AdamW clips as the SGD does). Only with DIAGNOSIS_HEAD "image"; ignored otherwise.
    DIAGNOSIS_OPTIMIZER = "shared"
    #: The head's AdamW learning rate where the SGD's is LEARNING_RATE: at every step it is the SGD's
    #: current rate x DIAGNOSIS_LEARNING_RATE / LEARNING_RATE (so warm-up, cosine and stages apply).
    DIAGNOSIS_LEARNING_RATE = 0.001
    #: The head's AdamW decoupled weight decay (per step w -= rate x decay x w; LayerNorm gamma/beta
    #: excluded); with "adamw" WEIGHT_DECAY's L2 term leaves the head's weights out.
    DIAGNOSIS_WEIGHT_DECAY = 0.01
    #: Factor on the diagnosis loss's gradient where it enters the shared backbone and pyramid
    #: (DIAGNOSIS_HEAD "image"; the forward pass is unchanged): 1 = plain backpropagation, 0 = the
    #: head trains on features that its loss does not shape, 0.1 = a tenth of its pull on them.
    DIAGNOSIS_BACKBONE_GRADIENT = 1.0

    # RPN -----------------------------------------------------------------------------------
    RPN_ANCHOR_SCALES = (32, 64, 128, 256, 512)
    RPN_ANCHOR_RATIOS = [0.5, 1, 2]
    RPN_ANCHOR_STRIDE = 1
    RPN_NMS_THRESHOLD = 0.7
    RPN_TRAIN_ANCHORS_PER_IMAGE = 256
    PRE_NMS_LIMIT = 6000
    POST_NMS_ROIS_TRAINING = 2000
    POST_NMS_ROIS_INFERENCE = 1000

    # Masks and images ----------------------------------------------------------------------
    USE_MINI_MASK = True
    MINI_MASK_SHAPE = (56, 56)
    IMAGE_RESIZE_MODE = "square"
    IMAGE_MIN_DIM = 800
    IMAGE_MAX_DIM = 1024
    IMAGE_MIN_SCALE = 0.0  # a float: --set IMAGE_MIN_SCALE=1.5 must be accepted (Matterport: 0)
    IMAGE_CHANNEL_COUNT = 3
    MEAN_PIXEL = np.array([123.7, 116.8, 103.9])

    # Heads ---------------------------------------------------------------------------------
    TRAIN_ROIS_PER_IMAGE = 200
    ROI_POSITIVE_RATIO = 0.33
    POOL_SIZE = 7
    #: The finest FPN level (2..5) the box/class head pools its ROIs from. Matterport's rule (2)
    #: puts an ROI of sqrt(area) s on level 4 + round(log2(s / 224 px)), made for 1024-px images: at
    #: 128 px every lesion under ~79 px lands on P2 (stride 4), sampled 7x7 out of ~20x20 cells. 3 or
    #: 4 pools them from the coarser, deeper levels; the mask head keeps Matterport's rule. (On the
    #: 128-px HAM10000 diagnosis preset 3 and 4 scored lower: benchmarks/README.md, session 8.)
    CLASSIFIER_ROI_MIN_LEVEL = 2
    #: Dropout rate on the box head's shared features before ``mrcnn_class_logits`` (training only,
    #: whatever TRAIN_BN says). 0 = Matterport.
    CLASS_HEAD_DROPOUT = 0.0
    MASK_POOL_SIZE = 14
    MASK_SHAPE = [28, 28]
    MAX_GT_INSTANCES = 100
    RPN_BBOX_STD_DEV = np.array([0.1, 0.1, 0.2, 0.2])
    BBOX_STD_DEV = np.array([0.1, 0.1, 0.2, 0.2])

    # Detection -----------------------------------------------------------------------------
    DETECTION_MAX_INSTANCES = 100
    DETECTION_MIN_CONFIDENCE = 0.7
    DETECTION_NMS_THRESHOLD = 0.3
    # A pixel of a detection's mask is lesion where the head's probability, resized into the box,
    # is >= this (Matterport: 0.5). Lower it for a model that under-segments (configs/ham10000_cpu).
    DETECTION_MASK_THRESHOLD = 0.5

    # Optimisation --------------------------------------------------------------------------
    LEARNING_RATE = 0.001
    LEARNING_MOMENTUM = 0.9
    WEIGHT_DECAY = 0.0001
    LOSS_WEIGHTS = {name: 1.0 for name in LOSS_NAMES}
    USE_RPN_ROIS = True
    TRAIN_BN = False
    GRADIENT_CLIP_NORM = 5.0

    # Beyond Matterport ---------------------------------------------------------------------
    # An image where no ROI is classified as foreground (or none reaches DETECTION_MIN_CONFIDENCE)
    # keeps its ROI of highest foreground probability (Matterport: no detection, an empty mask).
    DETECTION_FOREGROUND_FALLBACK = False
    # Training: the image's ground-truth boxes join its proposals before the ROIs are sampled
    # (detectron2's PROPOSAL_APPEND_GT; Matterport: proposals only), so every image with a lesion has
    # a positive ROI from the first step, the exact box among them.
    PROPOSALS_APPEND_GT = False
    # Filters of the RPN's shared 3x3 conv (Matterport: 512, which COCO weights need). 256, as
    # torchvision and TF Model Garden, halves the RPN's work: -20% FLOPs at 1024 px inference.
    RPN_CONV_CHANNELS = 512
    # BatchNorm statistics at inference: "same" follows TRAIN_BN (Matterport: with TRAIN_BN = True
    # each inference batch, often one image, is normalised by its own statistics); "moving" uses
    # the moving averages collected in training (the usual BatchNorm semantics; with TRAIN_BN = True
    # it scored +5.7 to +10 thr. Jaccard points on HAM10000, configs/ham10000_cpu.toml); "batch"
    # always uses the batch statistics.
    INFERENCE_BN = "same"
    # Colour constancy of every image the network sees, in training and inference alike
    # (mrcnn.imaging.mold_image): "none" (Matterport) or "shades_of_gray" (each photo's colour cast
    # estimated by the 6-norm of each channel and divided out, Barata et al. 2015), so a photo from
    # a camera with another white balance reaches the network in the colours it trained on.
    COLOUR_CONSTANCY = "none"
    #: How GRADIENT_CLIP_NORM applies: "per_variable" clips each variable's gradient on its own
    #: (tf.keras / Keras 3 ``clipnorm``, what TF2 ports of Matterport do); "global" clips the
    #: norm over all gradients together (Keras <= 2.3 ``clipnorm``, original Matterport). From
    #: random weights "global" at 5.0 learned clearly slower here (tests/learning_check.py).
    GRADIENT_CLIP_MODE = "per_variable"
    #: Mixed precision (float32 variables, losses and final outputs): false = float32; true or
    #: "float16" = Keras ``mixed_float16``, loss-scaled (GPUs); "bfloat16" = ``mixed_bfloat16``, no
    #: loss scaling (CPUs with AVX512-BF16 or AMX, where oneDNN runs bfloat16 convolutions at about
    #: twice the float32 rate; TPUs; Ampere and later GPUs); "auto" = "bfloat16" where TensorFlow
    #: sees no GPU and the CPU has native bfloat16 (:func:`cpu_has_bf16`), float32 elsewhere.
    MIXED_PRECISION = False
    #: The optimiser of the whole model: "sgd" = Matterport's SGD with LEARNING_MOMENTUM and the
    #: L2 term WEIGHT_DECAY x mean(w^2) in the loss; "adamw" = Keras AdamW (betas 0.9 / 0.999) at
    #: LEARNING_RATE (Adam-scale rates: ~1e-3) with decoupled weight decay ADAMW_WEIGHT_DECAY on every
    #: weight but BatchNorm / LayerNorm gamma and beta, no L2 term (WEIGHT_DECAY and LEARNING_MOMENTUM
    #: unused). Both clip as GRADIENT_CLIP_NORM / GRADIENT_CLIP_MODE say.
    OPTIMIZER = "sgd"
    ADAMW_WEIGHT_DECAY = 0.01
    #: Exponential moving average of the trainable weights (Keras' optimiser ``use_ema``): after
    #: every step avg = m avg + (1 - m) w with this momentum m (0 = off, Matterport). Training goes
    #: on with w; every checkpoint holds the average (the model that predicts), and so does the
    #: model after training; a resumed run goes on from w, kept in the optimiser state
    #: (SAVE_OPTIMIZER_STATE; from the average without it). 0.9995 averages over ~2,000 steps.
    WEIGHTS_EMA = 0.0
    #: Average the weights of the last N epoch checkpoints when a lesions.py training run ends
    #: (stochastic weight averaging of the schedule's tail; BatchNorm moving statistics averaged too):
    #: written next to them as mask_rcnn_<name>_<epoch>_average<N>.h5, which predict and evaluate
    #: then load by default; --weights last still resumes from the last epoch's own weights.
    #: 0 or 1 = off (Matterport).
    AVERAGE_LAST_EPOCHS = 0
    #: Write the optimiser's state (SGD momentum, AdamW moments, the WEIGHTS_EMA average, the step
    #: count) beside each checkpoint as optimizer_<name>_<epoch>.h5 (only the newest checkpoint's is
    #: kept), so that a resumed run in the same stage goes on with it instead of restarting it
    #: (mrcnn.optimizer_state). About twice the trainable weights with AdamW (ham10000_dx: 42 MB
    #: beside a 21 MB checkpoint). A resume uses a file that is there whatever this says.
    SAVE_OPTIMIZER_STATE = True
    #: The learning rate over a run of lesions.py: "stages" = Matterport's, each stage at a constant
    #: rate (heads: LEARNING_RATE, all layers: LEARNING_RATE / 10); "cosine" = one curve over all
    #: epochs: linear warm-up over LR_WARMUP_STEPS steps to LEARNING_RATE, then cosine down to 5 %
    #: of it at ALL_EPOCHS (the schedule of benchmarks/quality.py, there over a time budget).
    LR_SCHEDULE = "stages"
    LR_WARMUP_STEPS = 100
    #: Training on several machines (TF_CONFIG, see mrcnn.multiworker): seconds a gradient
    #: all-reduce waits for the other workers before the run stops with an error naming the lost one.
    MULTI_WORKER_TIMEOUT = 600
    #: Seed for shuffling and augmentation; None = not deterministic.
    SEED: int | None = None
    #: Run the mask head in training only on the real positive ROIs (at most
    #: ``int(TRAIN_ROIS_PER_IMAGE * ROI_POSITIVE_RATIO)``, padded back): same loss, far less work.
    TRAIN_MASKS_ON_POSITIVES_ONLY = True
    #: Channels of stage 2 of the basic-block backbones (BACKBONE "resnet18" / "resnet34"; doubled
    #: per stage). Must stay 64 for resnet50/101 (Matterport's fixed widths).
    BACKBONE_WIDTH = 64
    #: Mask head: number of 3x3 convs and their channels (Matterport: 4 x 256).
    MASK_HEAD_CONV_LAYERS = 4
    MASK_HEAD_CHANNELS = 256

    def __init__(self) -> None:
        self.BATCH_SIZE = self.IMAGES_PER_GPU * self.GPU_COUNT
        derived = derived_num_classes(self)
        if derived is not None:
            self.NUM_CLASSES = derived
        if self.IMAGE_RESIZE_MODE == "crop":
            self.IMAGE_SHAPE = np.array([self.IMAGE_MIN_DIM, self.IMAGE_MIN_DIM, self.IMAGE_CHANNEL_COUNT])
        else:
            self.IMAGE_SHAPE = np.array([self.IMAGE_MAX_DIM, self.IMAGE_MAX_DIM, self.IMAGE_CHANNEL_COUNT])
        # image_id(1) + original shape(3) + molded shape(3) + window(4) + scale(1) + active classes
        self.IMAGE_META_SIZE = 1 + 3 + 3 + 4 + 1 + self.NUM_CLASSES

    # ---------------------------------------------------------------------------------------
    # Read-only after validation
    def __setattr__(self, key: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"config is read-only after freeze(): {key} not changed;"
                                 f" use config.replace({key}=...) for a changed copy")
        super().__setattr__(key, value)

    def freeze(self) -> "Config":
        """Validate, then make this config read-only (the CLI's configs are). Returns ``self``."""
        self.validate()
        object.__setattr__(self, "_frozen", True)
        return self

    @property
    def frozen(self) -> bool:
        """True after :meth:`freeze`."""
        return bool(self.__dict__.get("_frozen", False))

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with ``changes`` applied (each checked as by :meth:`set`); the copy is
        frozen when this config is. ``self`` is not changed."""
        import copy

        new = copy.deepcopy(self)
        object.__setattr__(new, "_frozen", False)
        for key, value in changes.items():
            new.set(key, value, source="replace()")
        return new.freeze() if self.frozen else new.validate()

    # ---------------------------------------------------------------------------------------
    # Matterport API
    def display(self, title: str = "Configurations") -> None:
        """Print every public, non-callable attribute, sorted, name padded to 30 characters
        (Matterport's format; arrays as lists), under ``title``."""
        print(f"\n{title}:")
        for key in sorted(self.keys()):
            value = getattr(self, key)
            print(f"{key:30} {value.tolist() if isinstance(value, np.ndarray) else value}")
        print("\n", flush=True)

    # ---------------------------------------------------------------------------------------
    # Introspection and serialisation
    def keys(self) -> list[str]:
        """Names of all configuration attributes (upper-case, public, not methods)."""
        names = []
        for k in dir(self):
            if k.startswith("_") or not k.isupper():
                continue
            if k in CALLABLE_KEYS or not callable(getattr(self, k)):
                names.append(k)
        return names

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of every attribute (numpy arrays become lists)."""
        return {k: json_safe(getattr(self, k)) for k in sorted(set(self.keys()))}

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` (atomically: temp file + rename)."""
        write_json_atomic(path, self.to_dict(), sort_keys=True)

    # ---------------------------------------------------------------------------------------
    # Overrides (TOML presets, KEY=VALUE)
    def set(self, key: str, value: Any, source: str = "") -> None:
        """Set one attribute after checking it exists and the value's type matches the default.

        Derived values are recomputed. Raises :class:`ConfigError` naming ``key`` and ``source``.
        """
        where = f" (in {source})" if source else ""
        if key in DERIVED_KEYS:
            raise ConfigError(f"config key {key}{where} is derived and cannot be set; set its inputs instead")
        if not key.isupper() or key not in self.keys():
            close = [k for k in self.keys() if k.replace("_", "").startswith(key.upper().replace("_", "")[:5])]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{where}{hint}")
        current = getattr(self, key)
        value = _coerce(key, value, current, where)
        derived = derived_num_classes(self)
        if key == "NUM_CLASSES" and derived is not None and value != derived:
            raise ConfigError(f"NUM_CLASSES{where} follows CLASSES and DIAGNOSIS_HEAD ({derived} with"
                              f" {len(self.CLASSES)} class(es), DIAGNOSIS_HEAD {self.DIAGNOSIS_HEAD!r}), got {value};"
                              " set CLASSES instead")
        setattr(self, key, value)
        Config.__init__(self)  # recompute derived values

    def apply_overrides(self, overrides: Mapping[str, Any] | list[str], source: str = "") -> "Config":
        """Apply a mapping or a list of ``"KEY=VALUE"`` strings (values parsed as TOML, else str)."""
        if isinstance(overrides, Mapping):
            items = list(overrides.items())
        else:
            items = []
            for text in overrides:
                if "=" not in text:
                    raise ConfigError(f"override {text!r}{' in ' + source if source else ''} must look like KEY=VALUE")
                key, raw = text.split("=", 1)
                items.append((key.strip(), parse_value(raw.strip())))
        for key, value in items:
            self.set(key, value, source)
        return self

    def load_toml(self, path: str | Path) -> "Config":
        """Apply a TOML preset: top-level ``KEY = value`` pairs (tables are flattened)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key not in ("LOSS_WEIGHTS",):
                flat.update(value)  # [section] tables only group keys
            else:
                flat[key] = value
        return self.apply_overrides(flat, source=str(path))

    # ---------------------------------------------------------------------------------------
    # Validation
    def validate(self) -> "Config":
        """Refuse out-of-range or inconsistent settings. Raises :class:`ConfigError` (one line)."""
        err = _Checker()
        err.check(self.NAME is not None and str(self.NAME) != "", "NAME must be set to a non-empty string")
        err.check(self.NAME is None or NAME_RE.match(str(self.NAME)) is not None,
                  f"NAME must be a plain name (letters, digits, '_', '-', '.'; at most 64 characters; it names"
                  f" the run folder and the checkpoints), got {self.NAME!r}")
        if self.CLASSES is not None:
            names = list(self.CLASSES)
            err.check(len(names) >= 1 and all(isinstance(n, str) and n.strip() == n and n for n in names),
                      f"CLASSES must be a non-empty list of class names, got {self.CLASSES!r}")
            err.check(len({str(n).lower() for n in names}) == len(names),
                      f"CLASSES must not repeat a name (case-insensitive), got {names}")
            err.check("bg" not in {str(n).lower() for n in names},
                      "CLASSES lists the foreground classes only; 'BG' (background) is class 0 already")
        err.check(self.DIAGNOSIS_HEAD in ("roi", "image"),
                  f"DIAGNOSIS_HEAD must be roi or image, got {self.DIAGNOSIS_HEAD!r}")
        err.check(self.DIAGNOSIS_HEAD == "roi" or diagnoses(self),
                  "DIAGNOSIS_HEAD image needs two or more CLASSES (the diagnoses it predicts)")
        err.check(not self.CLASS_HEAD_IMAGE_CONTEXT or (diagnoses(self) and self.DIAGNOSIS_HEAD == "roi"),
                  "CLASS_HEAD_IMAGE_CONTEXT needs DIAGNOSIS_HEAD roi and two or more CLASSES")
        err.check(self.DIAGNOSIS_ROI_POOLING in ("mean", "top"),
                  f"DIAGNOSIS_ROI_POOLING must be mean or top, got {self.DIAGNOSIS_ROI_POOLING!r}")
        weights = self.CLASS_LOSS_WEIGHTS
        if isinstance(weights, str):
            err.check(weights in ("none", "balanced"),
                      f"CLASS_LOSS_WEIGHTS must be none, balanced or a list of positive numbers, got {weights!r}")
        else:
            n_classes = len(self.CLASSES) if self.CLASSES is not None else None
            err.check(isinstance(weights, (list, tuple)) and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                for w in weights), f"CLASS_LOSS_WEIGHTS must be none, balanced or positive numbers, got {weights!r}")
            err.check(n_classes is not None and isinstance(weights, (list, tuple)) and len(weights) == n_classes,
                      f"CLASS_LOSS_WEIGHTS lists {len(weights) if isinstance(weights, (list, tuple)) else '?'}"
                      f" weight(s) but CLASSES has {n_classes} class(es): one weight per class")
        err.check(isinstance(self.FOCAL_LOSS_GAMMA, (int, float)) and 0.0 <= self.FOCAL_LOSS_GAMMA <= 10.0,
                  f"FOCAL_LOSS_GAMMA must be in [0, 10], got {self.FOCAL_LOSS_GAMMA!r}")
        smoothing = self.DIAGNOSIS_LABEL_SMOOTHING
        err.check(isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool) and 0.0 <= smoothing <= 0.5,
                  f"DIAGNOSIS_LABEL_SMOOTHING must be in [0, 0.5], got {smoothing!r}")
        err.check(0.0 <= self.CLASS_BALANCED_SAMPLING <= 1.0,
                  f"CLASS_BALANCED_SAMPLING must be in [0, 1], got {self.CLASS_BALANCED_SAMPLING}")
        err.check(self.DIAGNOSIS_LOSS_WEIGHT >= 0 and math.isfinite(self.DIAGNOSIS_LOSS_WEIGHT),
                  f"DIAGNOSIS_LOSS_WEIGHT must be >= 0, got {self.DIAGNOSIS_LOSS_WEIGHT}")
        err.check(0.0 <= self.DIAGNOSIS_DROPOUT < 1.0,
                  f"DIAGNOSIS_DROPOUT must be in [0, 1), got {self.DIAGNOSIS_DROPOUT}")
        err.check(0.0 <= self.CLASS_HEAD_DROPOUT < 1.0,
                  f"CLASS_HEAD_DROPOUT must be in [0, 1), got {self.CLASS_HEAD_DROPOUT}")
        err.check(self.DIAGNOSIS_OPTIMIZER in ("shared", "adamw"),
                  f"DIAGNOSIS_OPTIMIZER must be shared or adamw, got {self.DIAGNOSIS_OPTIMIZER!r}")
        err.check(self.DIAGNOSIS_LEARNING_RATE > 0 and math.isfinite(self.DIAGNOSIS_LEARNING_RATE),
                  f"DIAGNOSIS_LEARNING_RATE must be > 0, got {self.DIAGNOSIS_LEARNING_RATE}")
        err.check(self.DIAGNOSIS_WEIGHT_DECAY >= 0 and math.isfinite(self.DIAGNOSIS_WEIGHT_DECAY),
                  f"DIAGNOSIS_WEIGHT_DECAY must be >= 0, got {self.DIAGNOSIS_WEIGHT_DECAY}")
        err.check(self.DIAGNOSIS_BACKBONE_GRADIENT >= 0 and math.isfinite(self.DIAGNOSIS_BACKBONE_GRADIENT),
                  f"DIAGNOSIS_BACKBONE_GRADIENT must be >= 0 (1 = plain backpropagation, 0 = none),"
                  f" got {self.DIAGNOSIS_BACKBONE_GRADIENT}")
        for key in ("GPU_COUNT", "IMAGES_PER_GPU", "STEPS_PER_EPOCH", "NUM_CLASSES", "IMAGE_MAX_DIM",
                    "IMAGE_CHANNEL_COUNT", "TRAIN_ROIS_PER_IMAGE", "MAX_GT_INSTANCES", "DETECTION_MAX_INSTANCES",
                    "POST_NMS_ROIS_TRAINING", "POST_NMS_ROIS_INFERENCE", "PRE_NMS_LIMIT", "POOL_SIZE",
                    "MASK_POOL_SIZE", "RPN_TRAIN_ANCHORS_PER_IMAGE", "RPN_ANCHOR_STRIDE", "TOP_DOWN_PYRAMID_SIZE",
                    "FPN_CLASSIF_FC_LAYERS_SIZE", "BACKBONE_WIDTH", "MASK_HEAD_CONV_LAYERS", "MASK_HEAD_CHANNELS"):
            value = getattr(self, key)
            err.check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
                      f"{key} must be a positive integer, got {value!r}")
        err.check(self.NUM_CLASSES >= 2 or type(self) is Config,
                  f"NUM_CLASSES counts the background too and must be >= 2, got {self.NUM_CLASSES}")
        err.check(self.CLASSIFIER_ROI_MIN_LEVEL in (2, 3, 4, 5) and not isinstance(self.CLASSIFIER_ROI_MIN_LEVEL, bool),
                  f"CLASSIFIER_ROI_MIN_LEVEL must be a pyramid level 2..5, got {self.CLASSIFIER_ROI_MIN_LEVEL!r}")
        err.check(self.VALIDATION_STEPS >= 0, f"VALIDATION_STEPS must be >= 0, got {self.VALIDATION_STEPS}")
        err.check(isinstance(self.MULTI_WORKER_TIMEOUT, (int, float)) and not isinstance(self.MULTI_WORKER_TIMEOUT, bool)
                  and self.MULTI_WORKER_TIMEOUT > 0,
                  f"MULTI_WORKER_TIMEOUT must be a number of seconds > 0, got {self.MULTI_WORKER_TIMEOUT!r}")
        if not callable(self.BACKBONE):
            err.check(self.BACKBONE in ("resnet50", "resnet101", "resnet18", "resnet34"),
                      f"BACKBONE must be 'resnet50', 'resnet101', 'resnet18', 'resnet34' or a callable,"
                      f" got {self.BACKBONE!r}")
            err.check(self.BACKBONE in ("resnet18", "resnet34") or self.BACKBONE_WIDTH == 64,
                      f"BACKBONE_WIDTH applies to resnet18/resnet34 only; {self.BACKBONE} has fixed widths"
                      f" (got {self.BACKBONE_WIDTH})")
        else:
            err.check(callable(self.COMPUTE_BACKBONE_SHAPE),
                      "COMPUTE_BACKBONE_SHAPE must be a callable when BACKBONE is a callable")
        err.check(self.IMAGE_RESIZE_MODE in ("none", "square", "pad64", "crop"),
                  f"IMAGE_RESIZE_MODE must be one of none, square, pad64, crop; got {self.IMAGE_RESIZE_MODE!r}")
        h, w = int(self.IMAGE_SHAPE[0]), int(self.IMAGE_SHAPE[1])
        if self.IMAGE_RESIZE_MODE in ("square", "crop"):
            err.check(h % 64 == 0 and w % 64 == 0,
                      f"image size must be a multiple of 64 (IMAGE_SHAPE {h}x{w} from IMAGE_MAX_DIM/IMAGE_MIN_DIM);"
                      f" try {max(64, round(h / 64) * 64)}")
        if self.IMAGE_RESIZE_MODE == "pad64":
            err.check(self.IMAGE_MIN_DIM % 64 == 0, "IMAGE_MIN_DIM must be a multiple of 64 in pad64 mode")
        err.check(self.IMAGE_MIN_DIM >= 1 and self.IMAGE_MIN_DIM <= self.IMAGE_MAX_DIM
                  or self.IMAGE_RESIZE_MODE in ("crop", "none"),
                  f"IMAGE_MIN_DIM ({self.IMAGE_MIN_DIM}) must be between 1 and IMAGE_MAX_DIM ({self.IMAGE_MAX_DIM})")
        err.check(self.IMAGE_MIN_SCALE >= 0, f"IMAGE_MIN_SCALE must be >= 0, got {self.IMAGE_MIN_SCALE}")
        err.check(len(self.BACKBONE_STRIDES) == 5, "BACKBONE_STRIDES must list 5 strides (P2..P6)")
        err.check(len(self.RPN_ANCHOR_SCALES) == len(self.BACKBONE_STRIDES),
                  f"RPN_ANCHOR_SCALES needs one scale per pyramid level ({len(self.BACKBONE_STRIDES)}),"
                  f" got {len(self.RPN_ANCHOR_SCALES)}")
        err.check(all(s > 0 for s in self.RPN_ANCHOR_SCALES), "RPN_ANCHOR_SCALES must be positive")
        err.check(len(self.RPN_ANCHOR_RATIOS) >= 1 and all(r > 0 for r in self.RPN_ANCHOR_RATIOS),
                  "RPN_ANCHOR_RATIOS must be a non-empty list of positive ratios")
        for key in ("RPN_NMS_THRESHOLD", "DETECTION_NMS_THRESHOLD", "DETECTION_MIN_CONFIDENCE"):
            value = getattr(self, key)
            err.check(0.0 <= value <= 1.0, f"{key} must be in [0, 1], got {value}")
        err.check(0.0 < self.DETECTION_MASK_THRESHOLD <= 1.0,
                  f"DETECTION_MASK_THRESHOLD must be in (0, 1], got {self.DETECTION_MASK_THRESHOLD}")
        err.check(0.0 < self.ROI_POSITIVE_RATIO <= 1.0,
                  f"ROI_POSITIVE_RATIO must be in (0, 1], got {self.ROI_POSITIVE_RATIO}")
        err.check(int(self.TRAIN_ROIS_PER_IMAGE * self.ROI_POSITIVE_RATIO) >= 1,
                  "TRAIN_ROIS_PER_IMAGE * ROI_POSITIVE_RATIO must allow at least one positive ROI")
        err.check(self.TRAIN_ROIS_PER_IMAGE <= self.POST_NMS_ROIS_TRAINING,
                  f"TRAIN_ROIS_PER_IMAGE ({self.TRAIN_ROIS_PER_IMAGE}) cannot exceed the proposals the RPN"
                  f" produces (POST_NMS_ROIS_TRAINING = {self.POST_NMS_ROIS_TRAINING})")
        err.check(self.DETECTION_MAX_INSTANCES <= self.POST_NMS_ROIS_INFERENCE,
                  f"DETECTION_MAX_INSTANCES ({self.DETECTION_MAX_INSTANCES}) cannot exceed"
                  f" POST_NMS_ROIS_INFERENCE ({self.POST_NMS_ROIS_INFERENCE})")
        if not callable(self.BACKBONE):
            err.check(list(self.BACKBONE_STRIDES) == [4, 8, 16, 32, 64],
                      f"BACKBONE_STRIDES must be [4, 8, 16, 32, 64] for the ResNet-FPN backbones (P2..P6),"
                      f" got {list(self.BACKBONE_STRIDES)}")
        ms = list(self.MASK_SHAPE)
        err.check(len(ms) == 2 and ms[0] == ms[1] and ms[0] == 2 * self.MASK_POOL_SIZE,
                  f"MASK_SHAPE must be [2*MASK_POOL_SIZE]*2 (the head upsamples once); got {ms} with"
                  f" MASK_POOL_SIZE {self.MASK_POOL_SIZE}")
        err.check(len(self.MINI_MASK_SHAPE) == 2 and min(self.MINI_MASK_SHAPE) >= 1,
                  f"MINI_MASK_SHAPE must be (h, w), got {self.MINI_MASK_SHAPE}")
        err.check(len(np.asarray(self.MEAN_PIXEL).reshape(-1)) == self.IMAGE_CHANNEL_COUNT,
                  f"MEAN_PIXEL has {len(np.asarray(self.MEAN_PIXEL).reshape(-1))} values but IMAGE_CHANNEL_COUNT"
                  f" is {self.IMAGE_CHANNEL_COUNT}")
        for key in ("RPN_BBOX_STD_DEV", "BBOX_STD_DEV"):
            arr = np.asarray(getattr(self, key), dtype=float).reshape(-1)
            err.check(arr.shape == (4,) and bool(np.all(arr > 0)), f"{key} must be 4 positive numbers")
        err.check(self.LEARNING_RATE > 0 and math.isfinite(self.LEARNING_RATE),
                  f"LEARNING_RATE must be > 0, got {self.LEARNING_RATE}")
        err.check(0 <= self.LEARNING_MOMENTUM < 1, f"LEARNING_MOMENTUM must be in [0, 1), got {self.LEARNING_MOMENTUM}")
        err.check(self.WEIGHT_DECAY >= 0, f"WEIGHT_DECAY must be >= 0, got {self.WEIGHT_DECAY}")
        err.check(self.OPTIMIZER in ("sgd", "adamw"), f"OPTIMIZER must be sgd or adamw, got {self.OPTIMIZER!r}")
        err.check(self.LR_SCHEDULE in ("stages", "cosine"), f"LR_SCHEDULE must be stages or cosine, got {self.LR_SCHEDULE!r}")
        err.check(isinstance(self.LR_WARMUP_STEPS, int) and self.LR_WARMUP_STEPS >= 0,
                  f"LR_WARMUP_STEPS must be an integer >= 0, got {self.LR_WARMUP_STEPS!r}")
        err.check(self.ADAMW_WEIGHT_DECAY >= 0 and math.isfinite(self.ADAMW_WEIGHT_DECAY),
                  f"ADAMW_WEIGHT_DECAY must be >= 0, got {self.ADAMW_WEIGHT_DECAY}")
        err.check(0.0 <= self.WEIGHTS_EMA < 1.0,
                  f"WEIGHTS_EMA must be in [0, 1) (0 = off), got {self.WEIGHTS_EMA}")
        err.check(isinstance(self.AVERAGE_LAST_EPOCHS, int) and not isinstance(self.AVERAGE_LAST_EPOCHS, bool)
                  and self.AVERAGE_LAST_EPOCHS >= 0,
                  f"AVERAGE_LAST_EPOCHS must be an integer >= 0 (0 = off), got {self.AVERAGE_LAST_EPOCHS!r}")
        err.check(self.GRADIENT_CLIP_NORM is None or self.GRADIENT_CLIP_NORM > 0,
                  f"GRADIENT_CLIP_NORM must be > 0 or None, got {self.GRADIENT_CLIP_NORM}")
        err.check(self.GRADIENT_CLIP_MODE in ("per_variable", "global"),
                  f"GRADIENT_CLIP_MODE must be per_variable or global, got {self.GRADIENT_CLIP_MODE!r}")
        err.check(set(self.LOSS_WEIGHTS) == set(LOSS_NAMES),
                  f"LOSS_WEIGHTS must have exactly the keys {', '.join(LOSS_NAMES)}")
        err.check(all(v >= 0 for v in self.LOSS_WEIGHTS.values()), "LOSS_WEIGHTS must be >= 0")
        err.check(self.TRAIN_BN in (True, False, None), f"TRAIN_BN must be true, false or None, got {self.TRAIN_BN!r}")
        err.check(isinstance(self.RPN_CONV_CHANNELS, int) and self.RPN_CONV_CHANNELS >= 1,
                  f"RPN_CONV_CHANNELS must be a positive integer, got {self.RPN_CONV_CHANNELS!r}")
        err.check(self.INFERENCE_BN in ("same", "moving", "batch"),
                  f"INFERENCE_BN must be same, moving or batch, got {self.INFERENCE_BN!r}")
        err.check(self.COLOUR_CONSTANCY in COLOUR_CONSTANCIES,
                  f"COLOUR_CONSTANCY must be one of {', '.join(COLOUR_CONSTANCIES)}, got {self.COLOUR_CONSTANCY!r}")
        err.raise_first()
        return self


# -------------------------------------------------------------------------------------------
# Diagnosis: the one rule for NUM_CLASSES and for "this model diagnoses"


def diagnoses(config: Any) -> bool:
    """True when ``config`` describes a model that names each image's class (a diagnosis over
    ``config.CLASSES``): CLASSES lists two or more names. Its ``detect`` results then carry
    ``class_probs``; a one-class (or Matterport, CLASSES None) model's do not."""
    classes = config.CLASSES
    return isinstance(classes, (list, tuple)) and len(classes) >= 2


def diagnosis_classes(config: Any) -> list[str] | None:
    """The diagnoses a model names (its ``class_probs`` are over them, the dataset scan reads
    labels for them): ``config.CLASSES`` of a diagnosing config (:func:`diagnoses`), else None."""
    return [str(c) for c in config.CLASSES] if config is not None and diagnoses(config) else None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has native bfloat16 dot products (``avx512_bf16`` or ``amx_bf16`` among
    the flags of /proc/cpuinfo, or of ``cpuinfo``): oneDNN then runs bfloat16 convolutions at about
    twice the float32 rate (without them bfloat16 is emulated and slower than float32)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def precision_policy(config: Any) -> str | None:
    """The Keras dtype policy that MIXED_PRECISION names: "mixed_float16" (true or "float16"),
    "mixed_bfloat16" ("bfloat16", or "auto" on a GPU-less machine whose CPU has native bfloat16),
    or None (float32)."""
    value = config.MIXED_PRECISION
    if value == "auto":
        import tensorflow as tf

        value = "bfloat16" if cpu_has_bf16() and not tf.config.list_physical_devices("GPU") else False
    if value is True or value == "float16":
        return "mixed_float16"
    return "mixed_bfloat16" if value == "bfloat16" else None


def loss_scaled(config: Any) -> bool:
    """True when the optimisers need loss scaling: float16 only (bfloat16 has float32's range)."""
    return precision_policy(config) == "mixed_float16"


def derived_num_classes(config: Any) -> int | None:
    """NUM_CLASSES as CLASSES and DIAGNOSIS_HEAD decide it (None: CLASSES unset, NUM_CLASSES is the
    user's): 1 + len(CLASSES), except with DIAGNOSIS_HEAD "image" and two or more CLASSES, where the
    detector keeps one class (lesion) and the diagnosis comes from the image-level head: 2."""
    classes = config.CLASSES
    if not isinstance(classes, (list, tuple)):
        return None
    if diagnoses(config) and config.DIAGNOSIS_HEAD == "image":
        return 2
    return 1 + len(classes)


# -------------------------------------------------------------------------------------------
# helpers

class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.errors.append(message)

    def raise_first(self) -> None:
        if self.errors:
            raise ConfigError(self.errors[0])


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value (``3``, ``0.5``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.lower() in ("none", "null"):
            return None
        return text


def _coerce(key: str, value: Any, current: Any, where: str) -> Any:
    """Convert ``value`` to the type of ``current`` or raise ConfigError."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key {key}{where} expects {expected}, got {value!r}")

    if key in CALLABLE_KEYS:
        return value
    if key == "CLASS_LOSS_WEIGHTS":
        if value is None:  # --set CLASS_LOSS_WEIGHTS=none parses as None
            return "none"
        if isinstance(value, str) or (isinstance(value, (list, tuple))
                                      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return [float(v) for v in value] if isinstance(value, (list, tuple)) else value
        raise bad("none, balanced or a list of numbers")
    if key == "MIXED_PRECISION":
        if isinstance(value, bool) or value in ("float16", "bfloat16", "auto"):
            return value
        raise bad('false, true, "float16", "bfloat16" or "auto"')
    if key == "CLASSES":
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of class names (strings)")
        return list(value)
    if current is None:
        return value
    if value is None:
        if key in ("GRADIENT_CLIP_NORM", "TRAIN_BN", "SEED"):
            return None
        if isinstance(current, str):  # --set AUGMENTATION=none, IMAGE_RESIZE_MODE=none: the word
            return "none"
        raise bad(type(current).__name__)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(current, (int, np.integer)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise bad("an integer")
        return int(value)
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise bad("a table")
        merged = dict(current)
        for k, v in value.items():
            if k not in current:
                raise ConfigError(f"config key {key}{where} has no entry {k!r}; known: {', '.join(current)}")
            merged[k] = _coerce(f"{key}.{k}", v, current[k], where)
        return merged
    if isinstance(current, (list, tuple, np.ndarray)):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("a list of numbers")
        if isinstance(current, np.ndarray):
            return np.array(value, dtype=current.dtype)
        return type(current)(value)
    return value
