"""The refinement stage and the shift check inside the quality benchmark (:mod:`benchmarks.quality`).

* :func:`train_refiner_for_budget`: the U-Net of :mod:`lesionkit.refine` trained in the detector's
  run folder for what is left of the wall-clock budget (``--refine-share`` of it), with the same
  learning-rate schedule machinery (:class:`benchmarks.time_budget.TimeBudget`);
* :func:`extra_scores`: the same checkpoint scored refined on val, and detector-only and refined on
  the shift check (:mod:`benchmarks.shift_check`) and on ``--real`` (full-size real images), with
  a compact ``side_by_side`` table of thresholded Jaccard, Jaccard and images under 0.65.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import shift_check

#: The keys of each block in ``side_by_side``.
SIDE_KEYS = ("threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity", "below_065", "seconds_per_image")


def refine_settings(config: Any) -> Any:
    """The config's RefineSettings, switched on (the benchmark trains the refiner when its share is > 0)."""
    from lesionkit.refine.settings import RefineSettings

    return dataclasses.replace(RefineSettings.from_config(config), enabled=True)


def train_refiner_for_budget(args: Any, config: Any, train_set: Any, run_dir: Path, seconds: float,
                             cpu_seconds: float | None, max_steps: int | None = None) -> dict[str, Any]:
    """Train the refiner in ``run_dir`` for ``seconds`` of wall clock (and ``cpu_seconds`` of CPU,
    ``max_steps`` steps if given); facts about it (``refiner_*`` keys)."""
    from benchmarks.time_budget import TimeBudget
    from lesionkit.refine.training import train_refiner

    settings = refine_settings(config)
    budget = TimeBudget(seconds, base_lr=settings.learning_rate, schedule=args.schedule,
                        warmup_steps=min(args.warmup_steps, 50), cpu_seconds=cpu_seconds, max_steps=max_steps)
    started = time.time()
    budget.start = started
    last = train_refiner(settings, train_set, None, run_dir, epochs=1_000_000, callbacks=[budget], verbose=2)
    return {"refiner_train_seconds": round(time.time() - started, 1), "refiner_steps": budget.steps,
            "refiner_final_loss": round(budget.last_logs.get("loss", float("nan")), 4),
            "refiner_checkpoint": str(last) if last else None,
            "refiner": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("enabled", "seed")},
            **{f"refiner_{k}": v for k, v in budget.steady_step_times().items()}}


def read_scores(folder: Path) -> list[dict[str, str]]:
    """The per-image rows of ``folder/scores.csv`` (as written by evaluate), as strings."""
    with open(folder / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def below_threshold(rows: list[dict[str, str]]) -> tuple[int, dict[str, float]]:
    """(images under 0.65 Jaccard, id -> Jaccard) from the rows of a scores.csv (:func:`read_scores`)."""
    jaccards = {r["image_id"]: float(r["jaccard"]) for r in rows}
    return sum(1 for v in jaccards.values() if v < shift_check.FAIL_BELOW), jaccards


def extra_scores(args: Any, model: Any, config: Any, options: Any, pairs: list, out_dir: Path,
                 checkpoint: Path, score: Callable[[Any, list, Path, Any], dict]) -> dict[str, Any]:
    """Blocks ``refined``, ``shift``, ``refined_shift``, ``real``, ``refined_real`` (each as the main
    metrics, plus ``below_065`` and per-shift Jaccard means) and ``side_by_side``."""
    from lesionkit.refine.checkpoints import newest_refiner
    from lesionkit.refine.inference import RefinedDetector, Refiner

    models = {"": model}
    path = newest_refiner(Path(checkpoint).parent)
    if path is not None:  # trained by this run (--refine-share > 0), or in the --weights run's folder
        refiner = Refiner(refine_settings(config), path)
        models["refined"] = RefinedDetector(model, refiner, options.min_confidence, options.top1)
    sets: dict[str, tuple[list, dict[str, str] | None]] = {"": (pairs, None)}
    if not args.no_shift:
        shift_pairs, kinds = shift_check.write_shift_set(pairs, out_dir.parent / "shift_set", seed=args.shift_seed)
        sets["shift"] = (shift_pairs, kinds)
    if args.real:
        from lesionkit.dataset_scan import pair_folders

        sets["real"] = (pair_folders(Path(args.real) / "images", Path(args.real) / "masks",
                                     root=args.real).pairs, None)
    blocks: dict[str, Any] = {}
    for set_name, (set_pairs, kinds) in sets.items():
        for model_name, each in models.items():
            name = "_".join(n for n in (model_name, set_name) if n)
            if not name:
                continue  # the detector on val: benchmarks.quality's own top-level metrics
            folder = out_dir.parent / f"evaluation_{name}"
            block = score(each, set_pairs, folder, options)
            if args.tta:
                block["tta"] = score(each, set_pairs, folder / "tta", dataclasses.replace(options, tta=True))
            rows = read_scores(folder)
            block["below_065"], by_id = below_threshold(rows)
            if kinds:
                block["by_shift"] = shift_check.kind_means([{"image_id": k, "jaccard": v} for k, v in by_id.items()],
                                                           kinds)
                if "diagnosis" in block:
                    block["by_shift_diagnosis_accuracy"] = shift_check.kind_accuracy(rows, kinds)
            blocks[name] = block
    return blocks


def side_by_side(record: dict[str, Any]) -> dict[str, Any]:
    """{set: {detector: {...}, refined: {...}}} of the headline numbers in a benchmark record."""
    table: dict[str, Any] = {}
    for set_name in ("val", "shift", "real"):
        row = {}
        for model_name in ("detector", "refined"):
            key = "_".join(n for n in ("refined" if model_name == "refined" else "",
                                       "" if set_name == "val" else set_name) if n)
            block = record if not key else record.get(key)
            if block is not None:
                row[model_name] = {k: block.get(k) for k in SIDE_KEYS}
        if row:
            table[set_name] = row
    return table
