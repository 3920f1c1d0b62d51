#!/usr/bin/env python
"""Quality benchmark: train Mask R-CNN from random weights for a fixed wall-clock budget, then
score the validation split with the ISIC 2018 metrics, exactly as ``lesions.py --mode evaluate``.

::

    python benchmarks/quality.py                                  # HAM10000, 30 min, configs/ham10000_cpu.toml
    python benchmarks/quality.py --budget-min 2 --max-val 100     # a quick check
    python benchmarks/quality.py --dataset isic2018 --config isic2018 --set IMAGES_PER_GPU=4

What it does:

1. reads ``--dataset`` through the toolkit (:class:`lesions.LesionDataset` via
   :func:`lesions.scan_and_split`: ISIC 2018 layout, or ``images/`` + ``masks/`` with the
   ``split`` column of ``metadata.csv``), builds the ``--config`` preset (+ ``--set``);
2. trains all layers from random initialisation on the train split (flips + 90-degree rotations
   by default) until ``--budget-min`` minutes of wall clock have passed since training started
   (:class:`benchmarks.budget.TimeBudget`, which also drives the learning-rate ``--schedule``);
   the checkpoint of the interrupted epoch is written as usual; with ``AVERAGE_LAST_EPOCHS`` = N
   >= 2 (config) the last N epochs' weights are averaged as ``lesions.py --mode train`` does;
3. evaluates that checkpoint (or that average, and then also the last epoch's own weights, into
   ``last_epoch``, without TTA) on the validation split (all of it, or a seeded sample of
   ``--max-val`` images) with :func:`lesionkit.prediction_run.load_inference_model` and
   :func:`lesionkit.evaluation_run.evaluate_model`, the code behind ``--mode evaluate`` (prediction PNGs,
   ``scores.csv`` and ``summary.json`` land in ``<run>/evaluation/``);
4. prints ONE JSON line on stdout (all progress goes to stderr) and appends it to ``--record``.

The JSON has: budget and time actually trained, steps, epochs (passes over the train split),
the official metrics (``threshold_jaccard``, ``jaccard``, ``dice``, ``sensitivity``,
``specificity``, ``accuracy``, ``map50``, ``map``), ``seconds_per_image`` of evaluation, how
many images fell back to the best box or got an empty mask, and ``other_load_share``: the share
of the machine's CPU capacity that *other* processes used while training (from /proc/stat minus
/proc/self/stat) -- a fair measurement has it near 0.

For a diagnosing config (two or more ``CLASSES``, e.g. ``--config ham10000_dx``) it also has, from
the same evaluation: ``diagnosis`` (``balanced_accuracy`` -- the ISIC 2018 Task 3 metric --,
``accuracy``, ``macro_auc``, ``mel_sensitivity``, ``mel_specificity``, ``recall`` per class,
``n_diagnosed``), ``baseline_classifier`` (issue 14's bar: a separate classifier's numbers on the
same split) and ``bar`` (ours against it: balanced accuracy above the baseline's while thresholded
Jaccard stays >= 0.82).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

import lesions  # noqa: E402  (light: TensorFlow is imported when the model is built)
from benchmarks.budget import SCHEDULES, CpuMeter  # noqa: E402
from lesionkit.training_run import complete_steps  # noqa: E402
from mrcnn import checkpoints  # noqa: E402
from mrcnn.augmentation import AUGMENTATIONS  # noqa: E402
from mrcnn.errors import UserError  # noqa: E402

DEFAULT_DATASET = REPO_DIR.parent / "shared" / "data" / "ham10000_200"
DEFAULT_REAL = REPO_DIR.parent / "shared" / "data" / "real_samples"
DEFAULT_CONFIG = "ham10000_cpu"
METRIC_KEYS = ("threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity", "accuracy", "map50", "map")
#: Issue 14's bar for a diagnosing model: a separate classifier's numbers on the HAM10000 val split
#: (1,952 images), melanoma recall 0.636 at melanoma specificity 0.861.
BASELINE_CLASSIFIER = {"balanced_accuracy": 0.612, "accuracy": 0.677, "macro_auc": 0.922,
                       "mel_sensitivity": 0.636, "mel_specificity": 0.861}
#: ... while the segmentation keeps at least this thresholded Jaccard.
THRESHOLD_JACCARD_FLOOR = 0.82


# -------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """All options."""
    p = argparse.ArgumentParser(prog="quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="ISIC 2018 or images/+masks/ folder"
                   " (default: ../shared/data/ham10000_200)")
    p.add_argument("--budget-min", type=float, default=30.0, help="training wall clock in minutes (default 30)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="preset in configs/ or a TOML file (default ham10000_cpu)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override a config value")
    p.add_argument("--max-val", type=int, default=0, metavar="N",
                   help="evaluate on a seeded sample of N validation images (0 = all)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning rate over the budget, from LEARNING_RATE (default cosine)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up steps (default 100)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                   help="training augmentation (= --set AUGMENTATION=...; default: the preset's AUGMENTATION):"
                        " flips = h/v flips + 90-degree rotations; default = those + scale/shift and colour; none")
    p.add_argument("--layers", default="all", help="layers to train (default all: random initialisation)")
    p.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps (the"
                   " schedule then ends there too)")
    p.add_argument("--cpu-budget-s", type=float, default=None, metavar="S",
                   help="also stop when this process has used S CPU seconds (the schedule ends there too):"
                        " compares settings at equal compute on a shared machine; the wall budget still applies")
    p.add_argument("--top1", action="store_true", help="lesion mask = best instance only (default: union of"
                   " the instances above DETECTION_MIN_CONFIDENCE, best box as fallback)")
    p.add_argument("--tta", action="store_true", help="also score with test-time augmentation (flips and a"
                   " rotation, as --mode evaluate --tta): adds a \"tta\" object with the same metrics")
    p.add_argument("--refine-share", type=float, default=0.3, metavar="F",
                   help="share of the budget that trains the refinement U-Net (lesionkit.refine) after the"
                        " detector; scored next to the detector alone (default 0.3; 0 = detector only)")
    p.add_argument("--no-shift", action="store_true", help="skip the shift check (benchmarks/shift_check.py:"
                   " the val sample re-drawn larger, smaller, cropped, recoloured, relit, vignetted, with rulers)")
    p.add_argument("--shift-seed", type=int, default=0, help="seed of the shift check (default 0)")
    p.add_argument("--real", metavar="DIR", default=str(DEFAULT_REAL) if DEFAULT_REAL.is_dir() else None,
                   help="also score the full-size images/ + masks/ of DIR (default ../shared/data/real_samples)")
    p.add_argument("--weights", metavar="CHECKPOINT", help="skip training: evaluate this checkpoint"
                   " (e.g. another mask rule with --top1)")
    p.add_argument("--train-refiner", action="store_true",
                   help="with --weights: train a new refiner for --refine-share x --budget-min (and x"
                        " --cpu-budget-s) on that detector, in a new run folder, then score both: compares"
                        " refiner settings (--set REFINE_...) on one detector")
    p.add_argument("--logs", default=str(REPO_DIR / "logs" / "quality"), help="run folders (default logs/quality)")
    p.add_argument("--record", metavar="FILE", help="also append the JSON line to FILE")
    p.add_argument("--label", default="", help="free text stored in the JSON (what this run tries)")
    return p


# -------------------------------------------------------------------------------------------
# Training


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then ``--augment`` as ``AUGMENTATION=...`` when given (it wins)."""
    return [*args.set, *([f"AUGMENTATION={args.augment}"] if args.augment else [])]


def new_run_dir(logs: Path) -> Path:
    """A fresh ``logs/quality-YYYYmmddTHHMMSS[-n]`` folder name (not created)."""
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    run, n = logs / f"quality-{stamp}", 1
    while run.exists():
        n += 1
        run = logs / f"quality-{stamp}-{n}"
    return run


def train_for_budget(args: argparse.Namespace, config: lesions.LesionConfig, train_set: Any,
                     run_dir: Path) -> dict[str, Any]:
    """Build the training model and train until the budget is spent; facts about the run."""
    from benchmarks.time_budget import TimeBudget
    from mrcnn import model as modellib

    model = modellib.MaskRCNN(mode="training", config=config, model_dir=str(run_dir.parent))
    model.log_dir = str(run_dir)
    model.checkpoint_path = str(run_dir / checkpoints.checkpoint_template(config.NAME))
    share = 1.0 - args.refine_share  # the refiner trains in the rest (benchmarks.quality_refine)
    budget = TimeBudget(args.budget_min * 60.0 * share, base_lr=config.LEARNING_RATE, schedule=args.schedule,
                        warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                        cpu_seconds=args.cpu_budget_s * share if args.cpu_budget_s else None)
    meter = CpuMeter().start()
    budget.start = time.time()
    model.train(train_set, None, learning_rate=config.LEARNING_RATE, epochs=100_000, layers=args.layers,
                augmentation=lesions.training_augmentation(config), custom_callbacks=[budget])
    load = meter.stop()
    written = checkpoints.checkpoints_in(run_dir)
    if not written:
        raise RuntimeError(f"training wrote no checkpoint into {run_dir}")
    return {"train_seconds": round(time.time() - budget.start, 1), "steps": budget.steps,
            "keras_epochs": checkpoints.checkpoint_epoch(written[-1]), "final_loss": round(budget.last_logs.get("loss", float("nan")), 4),
            "final_lr": budget.last_lr, "train_cpu_seconds": round(budget.cpu_used(), 1), "checkpoint": written[-1], **budget.steady_step_times(), **load}


# -------------------------------------------------------------------------------------------
# Evaluation (lesions.py --mode evaluate's code)


def sample_pairs(pairs: list, max_val: int, seed: int = 0) -> list:
    """All ``pairs``, or a seeded sample of ``max_val`` of them (kept in id order)."""
    if not max_val or max_val >= len(pairs):
        return list(pairs)
    chosen = set(random.Random(seed).sample(range(len(pairs)), max_val))
    return [p for i, p in enumerate(pairs) if i in chosen]


def evaluate_checkpoint(args: argparse.Namespace, checkpoint: Path, pairs: list, out_dir: Path) -> dict[str, Any]:
    """Load ``checkpoint`` as ``--mode evaluate`` does and score ``pairs``; metrics and timing
    (with ``--tta`` also a ``"tta"`` object: the same, with test-time augmentation, in out_dir/tta)."""
    from lesionkit.prediction_run import PredictOptions, load_inference_model
    from mrcnn.imaging import read_image

    config = lesions.config_for_weights(args, checkpoint, inference=True)
    model = load_inference_model(config, checkpoint, Path(args.logs))
    model.detect([read_image(pairs[0].image_path)], verbose=0)  # trace once, outside the timing
    options = PredictOptions(float(config.DETECTION_MIN_CONFIDENCE), top1=args.top1)
    out = score_model(model, pairs, out_dir, options)
    out.update(min_confidence=options.min_confidence, mask_threshold=config.DETECTION_MASK_THRESHOLD)
    if args.tta:
        out["tta"] = score_model(model, pairs, out_dir / "tta", dataclasses.replace(options, tta=True))
    from benchmarks.quality_refine import below_threshold, extra_scores, read_scores

    out["below_065"] = below_threshold(read_scores(out_dir))[0]
    out.update(extra_scores(args, model, config, options, pairs, out_dir, checkpoint, score_model))
    return out


def score_model(model: Any, pairs: list, out_dir: Path, options: Any) -> dict[str, Any]:
    """``evaluate_model`` (the code behind --mode evaluate) on ``pairs`` into ``out_dir``: metrics,
    counts, seconds per image, load."""
    from lesionkit.evaluation_run import evaluate_model

    meter = CpuMeter().start()
    started = time.time()
    summary = evaluate_model(model, pairs, out_dir, options)
    seconds = time.time() - started
    load = meter.stop()
    out = {key: _round(summary.get(key)) for key in METRIC_KEYS}
    out.update(n_val=len(summary["rows"]), eval_problems=len(summary["problems"]),
               seconds_per_image=round(seconds / max(len(pairs), 1), 4), eval_seconds=round(seconds, 1),
               eval_other_load_share=load["other_load_share"])
    out.update(mask_counts(out_dir / "predictions" / "summary.json"))
    if summary.get("diagnosis"):
        out["diagnosis"] = diagnosis_scores(summary["diagnosis"])
    return out


def diagnosis_scores(diagnosis: dict[str, Any]) -> dict[str, Any]:
    """The JSON's ``diagnosis`` object from evaluate's ``summary["diagnosis"]``: the headline
    Task 3 metrics, recall per class and how many images were scored."""
    from lesionkit.diagnosis_metrics import HEADLINE

    return {**{key: _round(diagnosis.get(key)) for key in HEADLINE},
            "recall": {name: _round(row["recall"]) for name, row in diagnosis["per_class"].items()},
            "n_diagnosed": diagnosis["n_diagnosed"]}


def against_bar(scores: dict[str, Any]) -> dict[str, Any]:
    """Issue 14's bar: balanced accuracy above the baseline classifier's while thresholded Jaccard
    stays >= the floor; each number beside its reference and the verdicts."""
    ours = scores["diagnosis"].get("balanced_accuracy")
    jaccard = scores.get("threshold_jaccard")
    beats = ours is not None and ours > BASELINE_CLASSIFIER["balanced_accuracy"]
    keeps = jaccard is not None and jaccard >= THRESHOLD_JACCARD_FLOOR
    return {"balanced_accuracy": ours, "baseline_balanced_accuracy": BASELINE_CLASSIFIER["balanced_accuracy"],
            "beats_baseline": beats, "threshold_jaccard": jaccard,
            "threshold_jaccard_floor": THRESHOLD_JACCARD_FLOOR, "keeps_jaccard": keeps, "passes": beats and keeps}


def mask_counts(summary_path: Path) -> dict[str, int]:
    """How many images used the best-box fallback and how many got an empty mask."""
    records = json.loads(summary_path.read_text())["images"]
    return {"fallback_images": sum(1 for r in records if r.get("fallback")),
            "empty_masks": sum(1 for r in records if not r.get("lesion_area_px"))}


def _round(value: Any) -> Any:
    return round(float(value), 5) if isinstance(value, (int, float)) else value


# -------------------------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON record."""
    started = time.time()
    config = lesions.build_config(args.config, config_overrides(args))
    report, train_ids, val_ids = lesions.scan_and_split(Path(args.dataset), config)
    if not val_ids:
        raise lesions.CliError(f"dataset {args.dataset} has no validation images")
    # no validation loss (VALIDATION_STEPS stays 0): every second of the budget trains
    config = complete_steps(config, len(train_ids), 0)
    train_set, = lesions.make_datasets(report, train_ids, config=config)
    from mrcnn.diagnosis import resolve_class_weights

    config = resolve_class_weights(config, train_set, verbose=True)
    run_dir = new_run_dir(Path(args.logs))
    run_dir.mkdir(parents=True)
    from lesionkit import dataset_scan

    dataset_scan.write_split(run_dir / "split.json", train_ids, val_ids, {"dataset": str(args.dataset)})
    setup_seconds = time.time() - started
    if args.weights:
        trained = {"checkpoint": Path(args.weights), "steps": 0, "keras_epochs": None, "train_seconds": 0.0}
        if args.train_refiner:
            trained.update(train_refiner_on(args, config, train_set, run_dir))
    else:
        trained = train_for_budget(args, config, train_set, run_dir)
        if args.refine_share > 0:
            from benchmarks.quality_refine import train_refiner_for_budget

            left = args.budget_min * 60.0 - trained["train_seconds"]
            cpu_left = args.cpu_budget_s - trained["train_cpu_seconds"] if args.cpu_budget_s else None
            trained.update(train_refiner_for_budget(args, config, train_set, run_dir, max(left, 1.0), cpu_left))
    by_id = {p.image_id: p for p in report.pairs}
    pairs = sample_pairs([by_id[i] for i in val_ids], args.max_val)
    last_epoch, averaged = Path(trained["checkpoint"]), None
    if not args.weights and config.AVERAGE_LAST_EPOCHS >= 2:  # the weights lesions.py would predict with
        from mrcnn.weights import write_tail_average

        averaged = write_tail_average(run_dir, config.AVERAGE_LAST_EPOCHS)
        trained["checkpoint"] = averaged or last_epoch
    scores = evaluate_checkpoint(args, trained["checkpoint"], pairs, run_dir / "evaluation")
    if averaged is not None:
        scores["last_epoch"] = score_without_tta(args, last_epoch, pairs, run_dir / "evaluation_last_epoch")
    images_seen = trained["steps"] * config.BATCH_SIZE
    if "diagnosis" in scores:
        scores.update(baseline_classifier=dict(BASELINE_CLASSIFIER), bar=against_bar(scores))
    return {"label": args.label, "budget_min": None if args.weights else args.budget_min, "train_seconds": trained["train_seconds"],
            "steps": trained["steps"], "epochs": round(images_seen / len(train_ids), 3),
            "keras_epochs": trained["keras_epochs"], "batch_size": config.BATCH_SIZE, "n_train": len(train_ids),
            **scores, "other_load_share": trained.get("other_load_share"),
            "own_cpu_share": trained.get("own_cpu_share"), "cpus": trained.get("cpus"),
            "cpu_budget_s": args.cpu_budget_s, "train_cpu_seconds": trained.get("train_cpu_seconds"),
            "warmup_steps": args.warmup_steps, "step_seconds": trained.get("step_seconds"), "step_cpu_seconds": trained.get("step_cpu_seconds"),
            "final_loss": trained.get("final_loss"), "final_lr": trained.get("final_lr"), "top1": args.top1,
            "setup_seconds": round(setup_seconds, 1), "config": args.config, "set": config_overrides(args),
            "schedule": args.schedule, "augment": config.AUGMENTATION, "dataset": str(args.dataset),
            "checkpoint": str(trained["checkpoint"]), "run_dir": str(run_dir), "refine_share": args.refine_share,
            **{k: v for k, v in trained.items() if k.startswith("refiner")},
            "total_seconds": round(time.time() - started, 1)}


def score_without_tta(args: argparse.Namespace, checkpoint: Path, pairs: list, out_dir: Path) -> dict[str, Any]:
    """Scores of another checkpoint of the run (with AVERAGE_LAST_EPOCHS: the last epoch's own
    weights, next to their average), without --tta."""
    scores = evaluate_checkpoint(argparse.Namespace(**{**vars(args), "tta": False}), checkpoint, pairs, out_dir)
    if "diagnosis" in scores:
        scores["bar"] = against_bar(scores)
    return {"checkpoint": checkpoint.name, **scores}


def train_refiner_on(args: argparse.Namespace, config: lesions.LesionConfig, train_set: Any,
                     run_dir: Path) -> dict[str, Any]:
    """``--weights --train-refiner``: the detector checkpoint copied into ``run_dir`` (so the run
    folder holds both stages, as after training) and a refiner trained there for ``--refine-share``
    of the budget (``--max-steps``: at most that many refiner steps); facts about it and the copied
    checkpoint."""
    from benchmarks.quality_refine import train_refiner_for_budget

    checkpoint = run_dir / Path(args.weights).name
    shutil.copy2(args.weights, checkpoint)
    config.save(str(run_dir / "config.json"))  # the effective config, REFINE_* --set values included
    cpu = args.cpu_budget_s * args.refine_share if args.cpu_budget_s else None
    facts = train_refiner_for_budget(args, config, train_set, run_dir, args.budget_min * 60.0 * args.refine_share, cpu,
                                     max_steps=args.max_steps)
    return {"checkpoint": checkpoint, **facts}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with progress on stderr; print the JSON line on stdout."""
    args = build_parser().parse_args(argv)
    if args.budget_min <= 0:
        build_parser().error("--budget-min must be > 0")
    if not 0.0 <= args.refine_share < 1.0:
        build_parser().error("--refine-share must be in [0, 1)")
    if args.train_refiner and not (args.weights and args.refine_share > 0):
        build_parser().error("--train-refiner needs --weights (the detector) and --refine-share > 0")
    record = run_reporting_errors(run, args, "quality")
    if record is None:
        return 2
    from benchmarks.quality_refine import side_by_side

    record["side_by_side"] = side_by_side(record)
    emit_record(record, args.record)
    return 0


def run_reporting_errors(run_fn: Any, args: argparse.Namespace, prog: str) -> dict[str, Any] | None:
    """``run_fn(args)`` with its progress on stderr; a user mistake (UserError, OSError) is one
    ``<prog>: error: ...`` line on stderr and None, a bug keeps its traceback."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return run_fn(args)
    except Exception as exc:  # noqa: BLE001 - user mistakes as one line, bugs with a traceback
        if isinstance(exc, (UserError, OSError)):
            print(f"{prog}: error: {lesions.one_line(exc)}", file=sys.stderr)
            return None
        raise


def emit_record(record: dict[str, Any], record_path: str | None) -> None:
    """Print ``record`` as one JSON line on stdout; also append it to ``record_path`` if given."""
    line = json.dumps(record)
    print(line, flush=True)
    if record_path:
        with open(record_path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
