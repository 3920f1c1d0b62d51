"""benchmarks/: the noisy-iteration filter, percentiles, measurement selection and ratio lines."""

from __future__ import annotations

import itertools

import pytest

from benchmarks import bench
from benchmarks.timing import Sample, percentile, time_loop


def fake_sampler(others: list[float]):
    """A ``sample`` function for time_loop: calls fn, returns 1 s with the next 'others' share."""
    shares = itertools.cycle(others)

    def sample(fn):
        fn()
        return Sample(1.0, next(shares), 1.9)
    return sample


def test_time_loop_discards_iterations_with_other_load():
    calls = []
    loop = time_loop(lambda: calls.append(1), warmup=2, runs=3, max_others_cores=0.15,
                     max_loop_s=60, sample=fake_sampler([0.0, 0.9, 0.1, 1.5, 0.05]))
    assert loop.clean and loop.discarded == 2 and len(loop.kept) == 3
    assert [s.others_cores for s in loop.kept] == [0.0, 0.1, 0.05]
    assert len(calls) == 2 + 5  # warm-up (first call included) + timed
    summary = loop.summary()
    assert summary["median_s"] == 1.0 and summary["others_cores"] == 0.05 and summary["clean"] is True


def test_time_loop_gives_up_after_its_budget_and_says_so():
    loop = time_loop(lambda: None, warmup=1, runs=3, max_others_cores=0.15, max_loop_s=0.0,
                     sample=fake_sampler([0.9, 0.5, 0.7, 0.2]))
    assert not loop.clean
    assert sorted(s.others_cores for s in loop.kept) == [0.5, 0.7, 0.9]


def test_percentile_matches_numpy_linear_rule():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 10) == pytest.approx(1.4)
    assert percentile(values, 90) == pytest.approx(7.6)


def test_selected_accepts_names_with_or_without_underscores():
    assert bench.selected("") == list(bench.MEASUREMENTS)
    assert bench.selected("infer512, train512b2") == ["infer512", "train512_b2"]
    with pytest.raises(SystemExit):
        bench.selected("infer9999")


def test_ratio_records_pair_matching_workloads():
    ours = [{"peer": "lesions", "name": "infer512_graph", "mode": "infer", "size": 512, "batch": 1,
             "median_s": 0.5, "others_cores": 0.01},
            {"peer": "lesions", "name": "train512_b2", "mode": "train", "size": 512, "batch": 2,
             "median_s": 3.0, "peak_rss_mb": 4000.0}]
    peers = [{"peer": "tf-model-garden", "mode": "infer", "size": 512, "batch": 1, "median_s": 0.663, "clean": True},
             {"peer": "tf-model-garden", "mode": "train", "size": 512, "batch": 2, "median_s": 4.156,
              "peak_rss_mb": 4710.0},
             {"peer": "torchvision", "mode": "infer", "size": 1024, "batch": 1, "median_s": 3.1}]
    ratios = bench.ratio_records(ours, peers, "stored")
    assert [(r["name"], r["ratio"]) for r in ratios] == [("infer512_graph", "lesions/tf-model-garden"),
                                                        ("train512_b2", "lesions/tf-model-garden")]
    assert ratios[0]["time_ratio"] == pytest.approx(0.5 / 0.663, abs=1e-3)
    assert ratios[1]["rss_ratio"] == pytest.approx(4000 / 4710, abs=1e-3)


def test_target_lines_hold_each_measurement_against_its_fastest_peer():
    ours = [{"peer": "lesions", "name": "infer512_graph", "mode": "infer", "size": 512, "batch": 1, "median_s": 1.7},
            {"peer": "lesions", "name": "train512_b2", "mode": "train", "size": 512, "batch": 2, "median_s": 6.0}]
    peers = [{"peer": "tf-model-garden", "mode": "infer", "size": 512, "batch": 1, "median_s": 2.0},
             {"peer": "torchvision", "mode": "infer", "size": 512, "batch": 1, "median_s": 1.0},
             {"peer": "tf-model-garden", "mode": "train", "size": 512, "batch": 2, "median_s": 16.0},
             {"peer": "torchvision", "mode": "train", "size": 512, "batch": 2, "median_s": 7.5}]
    lines = {r["name"]: r for r in bench.target_checks(bench.ratio_records(ours, peers, "run"))}
    assert set(lines) == {"infer512_graph", "train512_b2"}  # infer1024 not measured: no line
    infer, train = lines["infer512_graph"], lines["train512_b2"]
    # inference is held against Model Garden only (torchvision's faster line does not count): 1.7 / 2.0
    assert infer["against"] == "lesions/tf-model-garden" and infer["time_ratio"] == 0.85 and infer["met"] is True
    assert infer["speedup_needed"] == 1.0 and "--size 512" in infer["profile"]
    # training against the faster peer: 6.0 / 7.5 = 0.8 (against Model Garden it would be 0.375)
    assert train["against"] == "lesions/torchvision" and train["time_ratio"] == 0.8 and train["met"] is True
    slow = bench.target_checks(bench.ratio_records([{**ours[1], "median_s": 7.46}], peers, "run"))[0]
    assert slow["met"] is False and slow["speedup_needed"] == pytest.approx(0.995 / 0.85, abs=1e-3)


def test_bfloat16_lines_meet_float32_and_bfloat16_peers_float32_lines_float32_peers_only():
    ours = [{"peer": "lesions", "name": "infer512_graph", "mode": "infer", "size": 512, "batch": 1, "median_s": 0.6},
            {"peer": "lesions", "name": "infer512_bf16_graph", "mode": "infer", "size": 512, "batch": 1,
             "median_s": 0.3, "precision": "bfloat16"}]
    peers = [{"peer": "tf-model-garden", "mode": "infer", "size": 512, "batch": 1, "median_s": 0.5},
             {"peer": "tf-model-garden-bf16", "mode": "infer", "size": 512, "batch": 1, "median_s": 0.4,
              "precision": "bfloat16"}]
    ratios = {(r["name"], r["peer_precision"]): r["time_ratio"] for r in bench.ratio_records(ours, peers, "run")}
    assert ratios == {("infer512_graph", "float32"): 1.2, ("infer512_bf16_graph", "float32"): 0.6,
                      ("infer512_bf16_graph", "bfloat16"): 0.75}


def test_bfloat16_measurements_run_the_peers_through_the_bf16_wrapper(tmp_path):
    args = bench.parse_args(["--peers", "--peers-venvs", str(tmp_path), "--peers-dir", str(tmp_path)])
    plain = bench.peer_command("torchvision", "train512_b2", args)
    wrapped = bench.peer_command("torchvision", "train512_b2_bf16", args)
    assert plain[1] == "torchvision_bench.py" and plain[-6:] == ["--size", "512", "--batch", "2", "--threads", "2"]
    assert wrapped[1:4] == [str(bench.PEER_BF16), "torchvision", str(tmp_path.resolve())]
    assert wrapped[4:] == plain[2:]
    assert bench.peer_command("tf-model-garden", "train1024_b1_bf16", args) is None  # no peer workload


def test_peers_are_skipped_with_a_reason_when_their_venvs_are_absent(tmp_path):
    args = bench.parse_args(["--peers", "--peers-venvs", str(tmp_path / "none"), "--peers-dir", str(tmp_path)])
    missing = bench.missing_peer_venvs(args)
    assert set(missing) == {"tf-model-garden", "torchvision"}
    assert all("not found" in why for why in missing.values())
