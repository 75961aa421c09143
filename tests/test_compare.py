"""``benchmarks/compare.py`` end to end at its smallest scale: warm-up, runs, report, resume."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algos.evaluation.provenance import LoadSampler
from benchmarks import compare
from benchmarks.warmup import KINDS, WRONG, heldout_ids, wrong_solver
from tir_envs.procedural import generate


def test_wrong_variants_change_every_solver():
    import random

    rng = random.Random(0)
    for kind in KINDS:
        for seed in range(20):
            solver = generate(kind, seed).meta["solver"]
            assert wrong_solver(kind, solver, rng) != solver
    assert set(WRONG) == set(KINDS)


def test_heldout_is_disjoint_from_training():
    import numpy as np

    from benchmarks.warmup import HELDOUT_SEEDS, train_problems

    source, rng = train_problems(), np.random.default_rng(0)
    drawn = {source.sample(rng).id for _ in range(500)}
    assert all(int(pid.rsplit("/", 1)[1]) >= HELDOUT_SEEDS for pid in drawn)
    assert not drawn & set(heldout_ids(50))


def test_t_interval_and_verdict():
    mean, low, high = compare.t_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) == pytest.approx((low + high) / 2)
    assert high - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert "beats GRPO" in compare.verdict({"seeds": [0, 1, 2], "mean": 0.05,
                                            "ci95": [0.01, 0.09]})
    assert "does not measurably" in compare.verdict({"seeds": [0, 1, 2], "mean": 0.01,
                                                     "ci95": [-0.02, 0.04]})
    assert compare.t_interval([0.4]) == (0.4, None, None)
    assert "single seed" in compare.verdict({"seeds": [0], "mean": 0.1, "ci95": [None, None]})
    assert "worse" in compare.verdict({"seeds": [0, 1, 2], "mean": -0.05,
                                       "ci95": [-0.09, -0.01]})


def test_confirmation_uses_only_its_seeds_and_holms_step_down():
    confirmation = compare.Confirmation(tests=(("a", "base"), ("b", "base")), seeds=(2, 3, 4))

    def runs_of(scores):
        return {seed: {"final": score} for seed, score in enumerate(scores)}

    base = [0.40, 0.40, 0.40, 0.41, 0.39]
    # Seeds 0-1 (exploratory) would make "b" look large; only seeds 2-4 count.
    runs = {"base": runs_of(base), "a": runs_of([0.9, 0.9, 0.45, 0.46, 0.44]),
            "b": runs_of([0.9, 0.9, 0.41, 0.40, 0.41])}
    a_row, b_row = compare.confirm(runs, confirmation)
    assert a_row["seeds"] == b_row["seeds"] == [2, 3, 4]
    assert a_row["mean"] == pytest.approx(0.05)
    assert b_row["mean"] == pytest.approx(0.02 / 3)
    assert a_row["p"] == pytest.approx(0.0, abs=1e-9)  # the same +0.05 on every seed
    # Holm: the smallest p is held to alpha / 2, the next to alpha / 1.
    assert a_row["holm_threshold"] == pytest.approx(0.025)
    assert b_row["holm_threshold"] == pytest.approx(0.05)
    assert a_row["confirmed"] and not b_row["confirmed"]

    # Step-down: once the smallest p fails alpha / 2, the next is not rejected at alpha / 1
    # even though its own p is below alpha.
    runs["a"] = runs_of([0.9, 0.9, 0.45, 0.44, 0.45])  # differences .05 .03 .06: p 0.034
    runs["b"] = runs_of([0.9, 0.9, 0.45, 0.44, 0.46])  # differences .05 .03 .07: p 0.049
    a_row, b_row = compare.confirm(runs, confirmation)
    assert a_row["p"] < b_row["p"] < 0.05 and a_row["holm_threshold"] == pytest.approx(0.025)
    assert not a_row["confirmed"] and not b_row["confirmed"]

    # Nothing is confirmed while a seed is missing.
    del runs["a"][4]
    rows = {row["test"]: row for row in compare.confirm(runs, confirmation)}
    assert not rows["a - base"]["complete"] and rows["a - base"]["seeds"] == [2, 3]
    assert not any(row["confirmed"] for row in rows.values())


def test_smoke_run_sweeps_then_compares_writes_report_and_resumes(tmp_path):
    argv = ["--smoke", "--out", str(tmp_path), "--methods", "gtpo", "grpo", "gtpo-gamma1",
            "--method-seeds", "gtpo-gamma1=1", "--jobs", "1"]
    results = compare.main(argv)

    for name in ("results.json", "compare.md", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    budget = compare.SMOKE[0]
    # The sweep: each base algorithm at every rate, on the validation split only.
    assert set(saved["lr_sweep"]) == {"gtpo", "grpo"}
    for algo, row in saved["lr_sweep"].items():
        assert set(row["validation"]) == {f"{lr:g}" for lr in budget.sweep_lrs}
        assert row["best_lr"] == max(budget.sweep_lrs, key=lambda lr: row["validation"][f"{lr:g}"])
    assert {r["split"] for r in saved["sweep_runs"].values()} == {"validation"}
    assert not set(saved["problems"]["validation"]) & set(saved["problems"]["test"])
    # The main phase: the chosen rate, the test split, every seed (fewer where asked).
    assert set(saved["runs"]) == {"gtpo", "grpo", "gtpo-gamma1"}
    assert set(saved["runs"]["gtpo-gamma1"]) == {"0"}
    for method in ("gtpo", "grpo"):
        assert set(saved["runs"][method]) == {str(s) for s in range(budget.seeds)}
        run = saved["runs"][method]["0"]
        assert run["split"] == "test" and run["lr"] == saved["lr_sweep"][method]["best_lr"]
        assert [p["iteration"] for p in run["curve"]] == budget.eval_points()
        assert len(run["train"]) == budget.iterations
        assert run["train"][0]["update/steps"] <= budget.update_epochs * 1
        assert "adv/correct_code_turns_negative" in run["train"][0]
        scored = [p["pass@1"] for p in run["curve"][-budget.scored_evals:]]
        assert run["final"] == pytest.approx(sum(scored) / len(scored))
    assert saved["runs"]["gtpo-gamma1"]["0"]["lr"] == saved["lr_sweep"]["gtpo"]["best_lr"]
    # Seed k of every method starts from the same measured point.
    assert (saved["runs"]["gtpo"]["1"]["curve"][0] == saved["runs"]["grpo"]["1"]["curve"][0])
    assert saved["paired"]["gtpo - grpo"]["seeds"] == list(range(budget.seeds))
    assert "GRPO" in saved["verdict"] and "+3.0" in saved["verdict"]
    assert len(saved["machine"]["load_average_start"]) == 3
    assert len(saved["warmup"]["weights_sha256"]) == 64
    markdown = (tmp_path / "compare.md").read_text()
    assert "| gtpo |" in markdown and "95% CI" in markdown and saved["verdict"] in markdown
    assert "## Learning rates (validation split)" in markdown
    # The invocation is logged: what it ran, its wall time and load, and the report says so.
    made = [p for phase in ("sweep", "main") for p in (tmp_path / "runs" / phase).rglob("*.json")]
    (session,) = saved["sessions"]
    assert session["runs"] == len(made) == 9 and session["warmup_built"]
    assert session["wall_seconds"] > 0 and session["load_1min"]["samples"] >= 2
    assert "Wall time: " in markdown and "for 9 runs (the warm-up built in it too)" in markdown

    # Rerun: every finished run and the warm-up are read back, nothing is redone.
    runs = sorted((tmp_path / "runs").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    warmup = (tmp_path / "warmup" / "warmup.json").stat().st_mtime_ns
    again = compare.main(argv + ["--save-best-models", str(tmp_path / "models")])
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert (tmp_path / "warmup" / "warmup.json").stat().st_mtime_ns == warmup
    assert again["runs"] == results["runs"]
    assert again["sessions"] == saved["sessions"]  # it ran nothing, so it logged nothing
    # The best seed of each algorithm, rerun for its model, retraces its recorded curve exactly.
    best = again["best_models"]
    assert set(best) == {"gtpo", "grpo"}
    for method, entry in best.items():
        scores = {int(s): r["final"] for s, r in saved["runs"][method].items()}
        assert scores[entry["seed"]] == max(scores.values())
        assert entry["reproduced"] and entry["rerun_final"] == entry["final"]
        assert (Path(entry["model"]) / "config.json").is_file()

    # More seeds later reuse these runs; another budget or warm-up in the same dir is refused.
    main_run = tmp_path / "runs" / "main" / "gtpo" / "seed0.json"
    assert compare.read_finished(main_run, compare.dataclasses.replace(budget, seeds=5)) is not None
    other = compare.dataclasses.replace(budget, iterations=budget.iterations + 1)
    with pytest.raises(ValueError, match="another budget"):
        compare.read_finished(main_run, other)
    with pytest.raises(ValueError, match="trained at lr"):
        compare.read_finished(main_run, budget, lr=0.5)
    with pytest.raises(ValueError, match="another warm-up config"):
        compare.main(["--out", str(tmp_path), "--methods", "gtpo", "--jobs", "1"])


def test_the_load_sampler_samples_throughout_and_summarizes():
    with LoadSampler(every_s=0.01) as load:
        time.sleep(0.1)
    summary, values = load.summary(), [round(v, 2) for v in load.samples]
    assert summary["samples"] == len(values) >= 3
    assert (summary["start"], summary["end"]) == (values[0], values[-1])
    assert min(values) - 0.01 <= summary["mean"] <= summary["max"] == max(values)
