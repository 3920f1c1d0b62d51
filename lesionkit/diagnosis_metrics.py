"""ISIC 2018 Task 3 diagnosis metrics from true labels and class probabilities.

One image's diagnosis is the class with the highest probability (the first such class on a tie;
the official scorer counts a tie as "undecided", i.e. wrong, which float probabilities make rare).
Over N images with truth labels and a probability matrix [N, K] over ``classes``:

* ``balanced_accuracy``: the mean per-class recall over the classes present in the truth -- the
  ISIC 2018 Task 3 ranking metric ("balanced multiclass accuracy");
* ``accuracy``: the share of images whose diagnosis is right;
* per class: ``recall`` (None when the class is absent from the truth), ``precision`` (None when
  no image was diagnosed as it), ``support`` (true images), one-vs-rest ``auc`` of its probability
  column (None when the truth has only positives or only negatives of it);
* ``macro_auc``: the mean of those AUCs; the classes without one are listed in ``auc_skipped``;
* ``mel_sensitivity`` / ``mel_specificity``: melanoma (class ``mel``) against the rest, from the
  diagnoses (None without a ``mel`` class, or without melanoma / non-melanoma images);
* ``confusion_matrix``: counts [K, K], rows = truth, columns = diagnosis, in ``classes`` order.

scikit-learn does the counting (``confusion_matrix``, ``precision_recall_fscore_support``,
``roc_auc_score``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The melanoma class name (HAM10000 ``dx``): its sensitivity and specificity are reported apart.
MELANOMA = "mel"
#: Headline diagnosis metrics, in the order tables and benchmarks show them.
HEADLINE = ("balanced_accuracy", "accuracy", "macro_auc", "mel_sensitivity", "mel_specificity")
#: Prefix of the diagnosis metrics where they sit next to the Task 1 metrics in one flat table
#: (k-fold mean ± std, printed tables): ``dx_accuracy`` is not the pixel ``accuracy``.
FLAT_PREFIX = "dx_"


def check_probabilities(probs: Any, n_images: int, n_classes: int) -> np.ndarray:
    """``probs`` as float64 [n_images, n_classes]; ValueError naming the problem otherwise."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (n_images, n_classes):
        raise ValueError(f"probabilities have shape {probs.shape}, expected ({n_images}, {n_classes})")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities must be finite numbers")
    return probs


def predicted_indices(probs: np.ndarray) -> np.ndarray:
    """Diagnosis per image: the index of the highest probability (first on a tie), int [N]."""
    return np.argmax(np.asarray(probs), axis=1)


def predicted_names(probs: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Diagnosis per image as a class name."""
    return [classes[i] for i in predicted_indices(probs)]


def diagnosis_metrics(truth: Sequence[str], probs: Any, classes: Sequence[str]) -> dict[str, Any]:
    """All diagnosis metrics (module docstring) as a JSON-ready dict.

    truth: N class names, each one of ``classes``; probs: [N, K] probabilities (rows need not sum
    to 1, as in a Task 3 submission). N may be 0: then every metric is None.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = list(classes)
    unknown = sorted({t for t in truth} - set(classes))
    if unknown:
        raise ValueError(f"truth labels {unknown} are not among the classes {classes}")
    probs = check_probabilities(probs, len(truth), len(classes))
    if not len(truth):
        return empty_metrics(classes)
    y_true = np.array([classes.index(t) for t in truth], dtype=int)
    y_pred = predicted_indices(probs)
    labels = list(range(len(classes)))
    counts = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                    zero_division=np.nan)
    aucs = {name: _one_vs_rest_auc(y_true == k, probs[:, k]) for k, name in enumerate(classes)}
    per_class = {name: {"recall": _value(recall[k]), "precision": _value(precision[k]),
                        "support": int(support[k]), "auc": aucs[name]}
                 for k, name in enumerate(classes)}
    present = [r["recall"] for r in per_class.values() if r["recall"] is not None]
    with_auc = [a for a in aucs.values() if a is not None]
    return {
        "n_diagnosed": len(truth),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_auc": float(np.mean(with_auc)) if with_auc else None,
        "auc_skipped": [name for name, a in aucs.items() if a is None],
        **melanoma_rates(y_true, y_pred, classes),
        "per_class": per_class,
        "classes": classes,
        "confusion_matrix": counts.astype(int).tolist(),
    }


def empty_metrics(classes: Sequence[str]) -> dict[str, Any]:
    """The :func:`diagnosis_metrics` dict of zero images: every metric None, counts 0."""
    classes = list(classes)
    return {"n_diagnosed": 0, **{key: None for key in HEADLINE}, "auc_skipped": classes,
            "per_class": {name: {"recall": None, "precision": None, "support": 0, "auc": None} for name in classes},
            "classes": classes, "confusion_matrix": [[0] * len(classes) for _ in classes]}


def melanoma_rates(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """``mel_sensitivity`` (melanomas diagnosed as melanoma) and ``mel_specificity`` (other images
    not diagnosed as melanoma); None without a ``mel`` class or without such images."""
    if MELANOMA not in classes:
        return {"mel_sensitivity": None, "mel_specificity": None}
    mel = list(classes).index(MELANOMA)
    is_mel, said_mel = y_true == mel, y_pred == mel
    return {"mel_sensitivity": float(np.mean(said_mel[is_mel])) if is_mel.any() else None,
            "mel_specificity": float(np.mean(~said_mel[~is_mel])) if (~is_mel).any() else None}


def _one_vs_rest_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for ``positive`` [N] bool; None when only one side is present."""
    if positive.all() or not positive.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def _value(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def flat_metrics(diagnosis: dict[str, Any] | None) -> dict[str, float | None]:
    """The headline metrics and per-class recalls of a :func:`diagnosis_metrics` dict as flat
    ``dx_*`` keys (``dx_balanced_accuracy``, ..., ``dx_recall_mel``); {} for None."""
    if not diagnosis:
        return {}
    flat = {f"{FLAT_PREFIX}{key}": diagnosis.get(key) for key in HEADLINE}
    for name, row in diagnosis.get("per_class", {}).items():
        flat[f"{FLAT_PREFIX}recall_{name}"] = row.get("recall")
    return flat

