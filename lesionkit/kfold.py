"""k-fold cross-validation: train and evaluate each fold, then the mean and std of every metric
(the diagnosis metrics too, as ``dx_*`` keys, for a diagnosing model).

Folds come from :func:`lesionkit.dataset_scan.kfold_split` (deterministic by SEED). Fold ``i``
trains as config NAME ``<name>_fold<i>`` in its own run folder, is evaluated on its held-out
images into ``<run>/evaluation/``, and several folds end with ``<logs>/<name>_kfold_<stamp>.json``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lesionkit import dataset_scan
from lesionkit.evaluation_run import evaluate_checkpoint, summary_lines, table_values
from lesionkit.training_run import StartWeights, train_run
from mrcnn.checkpoints import checkpoints_in, final_weights, newest_checkpoint
from mrcnn.config import Config
from mrcnn.fileio import write_json_atomic

#: (train ids, validation ids) -> (train dataset, validation dataset), both prepared.
MakeDatasets = Callable[[list[str], list[str]], tuple[Any, Any]]


def fold_name(name: str, fold: int) -> str:
    """Config NAME of fold ``fold``: ``<name>_fold<fold>`` (a ``_foldN`` tail of ``name`` is replaced)."""
    return f"{base_name(name)}_fold{fold}"


def base_name(name: str) -> str:
    """``name`` without a ``_fold<N>`` tail."""
    return re.sub(r"_fold\d+$", "", str(name))


def run_kfold(config: Config, report: dataset_scan.ScanReport, folds: int, which: Sequence[int],
              start: StartWeights, logs: Path, make_datasets: MakeDatasets, split_info: dict,
              augmentation: Any = None) -> list[dict]:
    """Train and evaluate the folds ``which`` of ``folds``; returns each fold's summary.

    ``start.kind == "last"`` resumes each fold's own newest run (:func:`fold_start_weights`). With more than one fold the
    mean and std are printed and written to ``<logs>/<name>_kfold_<stamp>.json``.
    """

    split = dataset_scan.kfold_split([p.image_id for p in report.pairs], folds, config.SEED)
    summaries = []
    for i in which:
        train_ids, val_ids = split[i]
        fold_config = config.replace(NAME=fold_name(config.NAME, i))
        fold_start = fold_start_weights(start, logs, fold_config.NAME)
        print(f"\n=== Fold {i} of {folds} (0-based): {len(train_ids)} train, {len(val_ids)} validation ===")
        train_set, val_set = make_datasets(train_ids, val_ids)
        info = split_info | {"folds": folds, "fold": i, "seed": config.SEED, "all_folds": [f[1] for f in split]}
        log_dir = train_run(fold_config, train_set, val_set, fold_start, logs, info, augmentation)
        wanted = set(val_ids)
        pairs = [p for p in report.pairs if p.image_id in wanted]
        summary = evaluate_checkpoint(final_weights(checkpoints_in(log_dir)[-1]), fold_config, pairs,
                                      log_dir / "evaluation")
        print("\n".join(summary_lines({f"fold {i}": summary})))
        summaries.append(summary)
    if len(summaries) > 1:
        write_kfold_summary(logs, base_name(config.NAME), summaries)
    return summaries


def fold_start_weights(start: StartWeights, logs: Path, name: str) -> StartWeights:
    """Where fold ``name`` starts: with ``start.kind == "last"`` its own newest checkpoint (a fold
    not trained yet starts from random weights), otherwise ``start`` itself."""
    if start.kind != "last":
        return start
    found = newest_checkpoint(logs, name)
    return StartWeights("last", found) if found else StartWeights("none")


def write_kfold_summary(logs: Path, name: str, summaries: list[dict]) -> Path:
    """``<logs>/<name>_kfold_<stamp>.json``: per-fold summaries and mean/std of every metric of the
    table (Task 1, and for a diagnosing model the ``dx_*`` diagnosis metrics); prints them."""
    flat = [table_values(s) for s in summaries]
    keys = [k for k in dict.fromkeys(k for f in flat for k in f) if k != "n_images"]
    stats = dataset_scan.mean_and_std(flat, tuple(keys))
    path = logs / f"{name}_kfold_{datetime.datetime.now():%Y%m%dT%H%M%S}.json"
    write_json_atomic(path, {"folds": len(summaries), "mean_std": stats,
                             "per_fold": {str(i): s for i, s in enumerate(summaries)}})
    print(f"\nk-fold cross-validation over {len(summaries)} folds (mean ± std):")
    for key, value in stats.items():
        if value["mean"] is not None:
            print(f"  {key:22}  {value['mean']:.4f} ± {value['std']:.4f}")
    print(f"  summary: {path}")
    return path
