"""Split by metadata: a run's per-image scores regrouped by what metadata.csv says of each image.

The shift check re-draws val images; this asks the other question: on which kinds of *real* val
images does a model do well? Groups: the lesion's share of the photo (``lesion_fraction`` bands),
how the diagnosis was confirmed (``dx_type``; HAM10000's ``follow_up`` images are all nevi from
another camera), body site (``localization``), ``age`` bands and ``sex``. No model runs: it reads
the ``scores.csv`` of ``lesions.py --mode evaluate`` / ``benchmarks/quality.py``.

    python benchmarks/metadata_split.py logs/quality/<run>/evaluation [more runs ...] \\
        [--metadata ../shared/data/ham10000_200/metadata.csv]

Prints one JSON line per run and group: ``run``, ``group``, ``n``, ``threshold_jaccard`` and
``jaccard`` (means over the group's images) and, where the scores hold diagnoses,
``balanced_accuracy`` (over the classes present in the group), ``mel_sensitivity``,
``mel_specificity``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))

from lesionkit.diagnosis_metrics import diagnosis_metrics  # noqa: E402
from lesionkit.diagnosis_scoring import probability_column  # noqa: E402

DEFAULT_METADATA = REPO_DIR.parent / "shared" / "data" / "ham10000_200" / "metadata.csv"
HEAD_AND_NECK = ("face", "scalp", "ear", "neck")
TRUNK = ("back", "trunk", "abdomen", "chest")

#: group name -> (the metadata column it reads, the rule over the joined table, one row per image);
#: rows with that field missing fall out of the group.
GROUPS: dict[str, tuple[str, Callable[[pd.DataFrame], pd.Series]]] = {
    "lesion_fraction < 0.05": ("lesion_fraction", lambda t: t.lesion_fraction < 0.05),
    "lesion_fraction 0.05-0.15": ("lesion_fraction", lambda t: t.lesion_fraction.between(0.05, 0.15, inclusive="left")),
    "lesion_fraction 0.15-0.5": ("lesion_fraction", lambda t: t.lesion_fraction.between(0.15, 0.5, inclusive="left")),
    "lesion_fraction >= 0.5": ("lesion_fraction", lambda t: t.lesion_fraction >= 0.5),
    "dx_type histo": ("dx_type", lambda t: t.dx_type == "histo"),
    "dx_type follow_up": ("dx_type", lambda t: t.dx_type == "follow_up"),
    "dx_type consensus": ("dx_type", lambda t: t.dx_type == "consensus"),
    "site head and neck": ("localization", lambda t: t.localization.isin(HEAD_AND_NECK)),
    "site trunk": ("localization", lambda t: t.localization.isin(TRUNK)),
    "site extremities": ("localization", lambda t: t.localization.str.contains("extremity", na=False)),
    "age < 40": ("age", lambda t: t.age < 40),
    "age 40-59": ("age", lambda t: t.age.between(40, 60, inclusive="left")),
    "age >= 60": ("age", lambda t: t.age >= 60),
    "sex female": ("sex", lambda t: t.sex == "female"),
    "sex male": ("sex", lambda t: t.sex == "male"),
}


def read_scores(run: Path) -> pd.DataFrame:
    """``scores.csv`` of a run folder (or the file itself), indexed by image_id."""
    path = run / "scores.csv" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"metadata_split: no scores.csv at {path}")
    return pd.read_csv(path, dtype={"image_id": str}).set_index("image_id")


def group_scores(scores: pd.DataFrame) -> dict:
    """The metrics of one group of per-image score rows (module docstring)."""
    out = {"n": len(scores), "threshold_jaccard": round(float(scores.threshold_jaccard.mean()), 4),
           "jaccard": round(float(scores.jaccard.mean()), 4)}
    prefix = probability_column("")
    classes = [c[len(prefix):] for c in scores.columns if c.startswith(prefix)]
    if not classes or "true_dx" not in scores.columns:
        return out
    labelled = scores[scores.true_dx.notna()]
    if len(labelled):
        dx = diagnosis_metrics(list(labelled.true_dx), labelled[[probability_column(c) for c in classes]].to_numpy(), classes)
        out.update({k: None if dx[k] is None else round(dx[k], 4)
                    for k in ("balanced_accuracy", "mel_sensitivity", "mel_specificity")})
    return out


def split_by_metadata(scores: pd.DataFrame, metadata: pd.DataFrame) -> dict[str, dict]:
    """{group: metrics} over the scored images that metadata describes; empty groups left out."""
    table = scores.join(metadata.drop(columns=[c for c in metadata.columns if c in scores.columns]), how="inner")
    groups = {}
    for name, (column, rule) in GROUPS.items():
        if column in table.columns:
            member = table[rule(table).fillna(False).astype(bool)]
            if len(member):
                groups[name] = group_scores(member)
    return groups


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="evaluation folders (or scores.csv files)")
    p.add_argument("--metadata", type=Path, default=DEFAULT_METADATA, help="metadata.csv with image_id")
    args = p.parse_args(argv)
    if not args.metadata.is_file():
        raise SystemExit(f"metadata_split: no metadata file at {args.metadata}")
    metadata = pd.read_csv(args.metadata, dtype={"image_id": str})
    if "image_id" not in metadata.columns:
        raise SystemExit(f"metadata_split: {args.metadata} has no image_id column (columns: {', '.join(metadata.columns)})")
    metadata = metadata.set_index("image_id")
    for run in args.runs:
        for group, metrics in split_by_metadata(read_scores(run), metadata).items():
            print(json.dumps({"run": str(run), "group": group, **metrics}))


if __name__ == "__main__":
    main()
