"""k-fold cross-validation: deterministic folds, mean/std, and one fold through the real CLI."""

from __future__ import annotations

import json

import pytest

from lesionkit import dataset_scan
from tests.cli_helpers import TINY, run_cli


def test_folds_are_deterministic_disjoint_and_cover_everything():
    ids = [f"id{i:02d}" for i in range(11)]
    folds = dataset_scan.kfold_split(ids, 3, seed=5)
    assert folds == dataset_scan.kfold_split(list(reversed(ids)), 3, seed=5)
    assert folds != dataset_scan.kfold_split(ids, 3, seed=6)
    vals = [set(val) for _, val in folds]
    assert sorted(len(v) for v in vals) == [3, 4, 4]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == len(ids)
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == len(ids)


def test_kfold_refuses_impossible_k():
    with pytest.raises(dataset_scan.DatasetLayoutError, match="5 folds needs 2 <= folds <= the number of images \\(3\\)"):
        dataset_scan.kfold_split(["a", "b", "c"], 5, 0)


def test_mean_and_std_over_folds():
    stats = dataset_scan.mean_and_std([{"jaccard": 0.5, "map": None}, {"jaccard": 0.7, "map": None}],
                                     ("jaccard", "map"))
    assert stats["jaccard"]["mean"] == pytest.approx(0.6) and stats["jaccard"]["std"] == pytest.approx(0.1)
    assert stats["map"] == {"mean": None, "std": None}


def test_write_kfold_summary(tmp_path, capsys):
    from lesionkit.kfold import write_kfold_summary

    path = write_kfold_summary(tmp_path, "lesion", [{"jaccard": 0.5}, {"jaccard": 0.7}])
    data = json.loads(path.read_text())
    assert data["folds"] == 2 and data["mean_std"]["jaccard"]["mean"] == pytest.approx(0.6)
    assert "0.6000 ± 0.1000" in capsys.readouterr().out


def test_train_and_evaluate_one_fold_through_the_cli(tmp_path):
    proc = run_cli("--mode", "train", "--dataset", "demo", "--config", str(TINY), "--set", "HEADS_EPOCHS=0",
                   "--set", "ALL_EPOCHS=1", "--folds", "3", "--fold", "1", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = list((tmp_path / "logs").iterdir())
    assert run.name.startswith("lesion_fold1")
    split = json.loads((run / "split.json").read_text())
    assert (split["folds"], split["fold"], split["n_train"], split["n_val"]) == (3, 1, 4, 2)
    assert split["val"] == split["all_folds"][1]
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert summary["n_images"] == 2 and "jaccard" in summary and "map50" in summary
    assert (run / "mask_rcnn_lesion_fold1_0001.h5").is_file()


def test_each_fold_resumes_its_own_run(tmp_path):
    from lesionkit.kfold import fold_start_weights
    from lesionkit.training_run import StartWeights

    run = tmp_path / "lesion_fold120260404T0000"
    run.mkdir()
    (run / "mask_rcnn_lesion_fold1_0003.h5").write_bytes(b"")
    (tmp_path / "lesion20260505T0000").mkdir()  # the plain run is not a fold's
    (tmp_path / "lesion20260505T0000" / "mask_rcnn_lesion_0009.h5").write_bytes(b"")
    last = StartWeights("last")
    assert fold_start_weights(last, tmp_path, "lesion_fold1") == StartWeights("last", run / "mask_rcnn_lesion_fold1_0003.h5")
    assert fold_start_weights(last, tmp_path, "lesion_fold0") == StartWeights("none")  # not trained yet
    coco = StartWeights("coco", tmp_path / "coco.h5")
    assert fold_start_weights(coco, tmp_path, "lesion_fold1") == coco
