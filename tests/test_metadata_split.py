"""benchmarks/metadata_split.py: per-image scores regrouped by metadata.csv, against hand-computed
values."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmarks.metadata_split import main, split_by_metadata

CLASSES = ["mel", "nv"]


def scores_table() -> pd.DataFrame:
    """Four scored images: two small lesions (one a missed melanoma), two large (both right)."""
    rows = [  # image_id, jaccard, threshold_jaccard, true_dx, p_mel, p_nv
        ("a", 0.90, 0.90, "mel", 0.2, 0.8),
        ("b", 0.60, 0.00, "nv", 0.1, 0.9),
        ("c", 0.80, 0.80, "mel", 0.7, 0.3),
        ("d", 0.70, 0.70, "nv", 0.4, 0.6),
    ]
    return pd.DataFrame(rows, columns=["image_id", "jaccard", "threshold_jaccard", "true_dx", "p_mel", "p_nv"]
                        ).set_index("image_id")


def metadata_table() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "dx": ["mel", "nv", "mel", "nv", "nv"],
                         "lesion_fraction": [0.02, 0.04, 0.3, 0.6, 0.01],
                         "age": [35.0, None, 70.0, 65.0, 20.0], "sex": ["male"] * 5}).set_index("image_id")


def test_groups_hold_the_means_and_the_diagnosis_of_their_images_only():
    groups = split_by_metadata(scores_table(), metadata_table())
    small = groups["lesion_fraction < 0.05"]  # a, b (e is not scored)
    assert small["n"] == 2 and small["threshold_jaccard"] == pytest.approx(0.45)
    assert small["jaccard"] == pytest.approx(0.75)
    # a: mel called nv (recall mel 0), b: nv right (recall nv 1) -> balanced accuracy 0.5
    assert small["balanced_accuracy"] == pytest.approx(0.5)
    assert small["mel_sensitivity"] == 0.0 and small["mel_specificity"] == 1.0
    old = groups["age >= 60"]  # c, d: both right; b's missing age keeps it out of every age band
    assert old["n"] == 2 and old["balanced_accuracy"] == 1.0 and old["threshold_jaccard"] == pytest.approx(0.75)
    assert sum(g["n"] for name, g in groups.items() if name.startswith("age")) == 3
    assert groups["sex male"]["n"] == 4
    # no dx_type / localization column in this metadata: those groups are absent, not empty
    assert not any(name.startswith(("dx_type", "site")) for name in groups)


def test_cli_prints_one_json_line_per_group_and_names_a_missing_scores_file(tmp_path, capsys):
    run = tmp_path / "evaluation"
    run.mkdir()
    scores_table().to_csv(run / "scores.csv")
    metadata_table().to_csv(tmp_path / "metadata.csv")
    main([str(run), "--metadata", str(tmp_path / "metadata.csv")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["group"] for line in lines} >= {"lesion_fraction < 0.05", "lesion_fraction >= 0.5", "sex male"}
    assert all(line["run"] == str(run) for line in lines)
    with pytest.raises(SystemExit, match="no scores.csv at .*nowhere"):
        main([str(tmp_path / "nowhere"), "--metadata", str(tmp_path / "metadata.csv")])
    metadata_table().reset_index().rename(columns={"image_id": "id"}).to_csv(tmp_path / "ids.csv", index=False)
    with pytest.raises(SystemExit, match=r"ids.csv has no image_id column \(columns: id, dx, "):
        main([str(run), "--metadata", str(tmp_path / "ids.csv")])
