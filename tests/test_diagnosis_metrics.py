"""Diagnosis metrics (lesionkit.diagnosis_metrics) against hand-computed values and the official
ISIC 2018 Task 3 scorer (isic-challenge-scoring), and the confusion-matrix picture."""

from __future__ import annotations

import numpy as np
import pytest

from lesionkit import diagnosis_metrics as dm

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def one_hot_probs(names: list[str], classes: list[str] = CLASSES, p: float = 0.7) -> np.ndarray:
    """Probability rows with ``p`` on the named class and the rest spread evenly."""
    rows = np.full((len(names), len(classes)), (1 - p) / (len(classes) - 1))
    for i, name in enumerate(names):
        rows[i, classes.index(name)] = p
    return rows


# Six images, three classes: truth  mel mel mel nv nv bcc ; diagnosis mel nv mel nv mel bcc
SMALL_CLASSES = ["bcc", "mel", "nv"]
SMALL_TRUTH = ["mel", "mel", "mel", "nv", "nv", "bcc"]
SMALL_PROBS = np.array([
    [0.1, 0.8, 0.1],   # mel -> mel
    [0.1, 0.3, 0.6],   # mel -> nv
    [0.2, 0.5, 0.3],   # mel -> mel
    [0.1, 0.2, 0.7],   # nv  -> nv
    [0.0, 0.9, 0.1],   # nv  -> mel
    [0.6, 0.2, 0.2],   # bcc -> bcc
])


def test_small_example_by_hand() -> None:
    m = dm.diagnosis_metrics(SMALL_TRUTH, SMALL_PROBS, SMALL_CLASSES)
    # recalls: bcc 1/1, mel 2/3, nv 1/2 -> balanced accuracy (1 + 2/3 + 1/2) / 3 = 13/18
    assert m["balanced_accuracy"] == pytest.approx(13 / 18)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["mel"] == {"recall": pytest.approx(2 / 3), "precision": pytest.approx(2 / 3),
                                     "support": 3, "auc": pytest.approx(6 / 9)}
    assert m["per_class"]["nv"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["nv"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["bcc"]["precision"] == pytest.approx(1.0)
    # AUC = share of (positive, negative) pairs ranked right, ties half. mel column: positives
    # 0.8 0.3 0.5, negatives 0.2 0.9 0.2: each positive beats two of the three -> 6/9 (above)
    # nv column: positives 0.7 0.1, negatives 0.1 0.6 0.3 0.2: 0.7 wins 4, 0.1 ties 0.1 (0.5) -> 4.5/8
    assert m["per_class"]["nv"]["auc"] == pytest.approx(4.5 / 8)
    # bcc column: positive 0.6 beats all five negatives
    assert m["per_class"]["bcc"]["auc"] == pytest.approx(1.0)
    assert m["macro_auc"] == pytest.approx((6 / 9 + 4.5 / 8 + 1.0) / 3)
    assert m["auc_skipped"] == []
    # melanoma: 2 of 3 found; of the 3 others one (nv #5) was called melanoma
    assert m["mel_sensitivity"] == pytest.approx(2 / 3)
    assert m["mel_specificity"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 2, 1], [0, 1, 1]]
    assert m["classes"] == SMALL_CLASSES and m["n_diagnosed"] == 6


def test_balanced_accuracy_is_the_mean_recall_and_matches_sklearn() -> None:
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(3)
    truth = list(rng.choice(CLASSES, size=80, p=[0.05, 0.1, 0.1, 0.05, 0.1, 0.55, 0.05]))
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=80)
    m = dm.diagnosis_metrics(truth, probs, CLASSES)
    recalls = [r["recall"] for r in m["per_class"].values() if r["recall"] is not None]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    pred = [CLASSES[i] for i in probs.argmax(axis=1)]
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))


def test_matches_the_official_isic2018_task3_scorer() -> None:
    """Balanced accuracy and per-class AUC as isic-challenge-scoring computes them."""
    pd = pytest.importorskip("pandas")
    official = pytest.importorskip("isic_challenge_scoring.metrics")
    columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    names = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
    rng = np.random.default_rng(11)
    truth = [names[i] for i in rng.integers(0, 7, size=60)]
    probs = rng.dirichlet(np.ones(7), size=60)
    ids = [f"ISIC_{i:07d}" for i in range(60)]
    truth_df = pd.DataFrame([[1.0 if t == n else 0.0 for n in names] for t in truth], index=ids, columns=columns)
    pred_df = pd.DataFrame(probs, index=ids, columns=columns)
    weights = pd.Series(1.0, index=ids)
    m = dm.diagnosis_metrics(truth, probs, names)
    assert m["balanced_accuracy"] == pytest.approx(official.balanced_multiclass_accuracy(truth_df, pred_df, weights))
    for column, name in zip(columns, names, strict=True):
        assert m["per_class"][name]["auc"] == pytest.approx(official.auc(truth_df[column], pred_df[column], weights))


def test_class_absent_from_truth_is_skipped_and_named() -> None:
    truth = ["nv", "nv", "mel", "bkl"]
    probs = one_hot_probs(["nv", "df", "mel", "bkl"])  # one nv diagnosed as df, which is not in the truth
    m = dm.diagnosis_metrics(truth, probs, CLASSES)
    assert m["per_class"]["df"] == {"recall": None, "precision": 0.0, "support": 0, "auc": None}
    assert m["per_class"]["vasc"]["precision"] is None  # never diagnosed
    assert m["auc_skipped"] == ["akiec", "bcc", "df", "vasc"]
    # recalls over present classes: bkl 1, mel 1, nv 1/2
    assert m["balanced_accuracy"] == pytest.approx(2.5 / 3)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["mel_sensitivity"] == 1.0 and m["mel_specificity"] == 1.0


def test_without_melanoma_class_or_images() -> None:
    m = dm.diagnosis_metrics(["nv", "bcc"], [[0.9, 0.1], [0.2, 0.8]], ["nv", "bcc"])
    assert m["mel_sensitivity"] is None and m["mel_specificity"] is None
    assert m["balanced_accuracy"] == 1.0 and m["macro_auc"] == 1.0
    m = dm.diagnosis_metrics(["nv", "nv"], one_hot_probs(["mel", "nv"]), CLASSES)
    assert m["mel_sensitivity"] is None and m["mel_specificity"] == 0.5


def test_empty_and_bad_inputs() -> None:
    m = dm.diagnosis_metrics([], np.zeros((0, 7)), CLASSES)
    assert m["n_diagnosed"] == 0 and m["balanced_accuracy"] is None and m["accuracy"] is None
    with pytest.raises(ValueError, match=r"shape \(2, 6\), expected \(2, 7\)"):
        dm.diagnosis_metrics(["nv", "mel"], np.zeros((2, 6)), CLASSES)
    with pytest.raises(ValueError, match="finite"):
        dm.diagnosis_metrics(["nv"], [[np.nan] * 7], CLASSES)
    with pytest.raises(ValueError, match=r"\['lesion'\] are not among"):
        dm.diagnosis_metrics(["lesion"], np.ones((1, 7)), CLASSES)


def test_flat_metrics() -> None:
    m = dm.diagnosis_metrics(SMALL_TRUTH, SMALL_PROBS, SMALL_CLASSES)
    flat = dm.flat_metrics(m)
    assert flat["dx_balanced_accuracy"] == m["balanced_accuracy"]
    assert flat["dx_recall_mel"] == pytest.approx(2 / 3)
    assert set(flat) == {"dx_balanced_accuracy", "dx_accuracy", "dx_macro_auc", "dx_mel_sensitivity",
                         "dx_mel_specificity", "dx_recall_bcc", "dx_recall_mel", "dx_recall_nv"}
    assert dm.flat_metrics(None) == {}


def test_confusion_matrix_picture(tmp_path) -> None:
    from PIL import Image

    from mrcnn.visualize import save_confusion_matrix

    m = dm.diagnosis_metrics(SMALL_TRUTH, SMALL_PROBS, SMALL_CLASSES)
    path = save_confusion_matrix(m["confusion_matrix"], m["classes"], tmp_path / "confusion_matrix.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height > 100
    assert [p.name for p in tmp_path.iterdir()] == ["confusion_matrix.png"]  # no temporary file left
