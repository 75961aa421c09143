"""The supervised cold start (``algos.warmup``): splits, wrong variants, bit-reproducible
checkpoints, the checkpoint cache, and ``tir train --warmup`` end to end on a tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from algos import warmup as lib
from algos.evaluation import bootstrap_pass1
from algos.models import train_top_layers
from algos.tiny import save_tiny, tiny_model, tiny_tokenizer
from tir_envs.procedural import generate


def test_splits_are_disjoint_and_training_never_draws_them():
    kinds = ("digit_sum", "nth_prime")
    test = lib.heldout_ids(kinds, 40)
    validation = lib.heldout_ids(kinds, 40, "validation")
    assert len(test) == len(set(test)) == 80
    assert not set(test) & set(validation)
    seeds = [int(i.rsplit("/", 1)[1]) for i in test + validation]
    assert max(seeds) < lib.HELDOUT_SEEDS
    source = lib.ProceduralProblems(kinds)
    rng = np.random.default_rng(0)
    drawn = [source.sample(rng) for _ in range(200)]
    assert all(p.meta["seed"] >= lib.HELDOUT_SEEDS for p in drawn)
    assert {p.meta["kind"] for p in drawn} == set(kinds)
    with pytest.raises(ValueError):
        lib.heldout_ids(kinds, 1, "train")


def _printed(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})  # noqa: S102 - the procedural solvers and their variants, not model code
    return out.getvalue().strip()


@pytest.mark.parametrize("kind", sorted(lib.WRONG))
def test_wrong_variants_run_and_are_mostly_wrong(kind):
    rng = random.Random(0)
    wrong = 0
    for seed in range(1000, 1006):
        problem = generate(kind, seed)
        solver = problem.meta["solver"]
        assert _printed(solver) == problem.answer
        variant = lib.wrong_solver(kind, solver, rng)
        assert variant != solver
        wrong += _printed(variant) != problem.answer
    assert wrong >= 5


def test_warmup_config_checks_its_fields():
    with pytest.raises(ValueError, match="no wrong variants"):
        lib.WarmupConfig(kinds=("partitions",))
    with pytest.raises(ValueError):
        lib.WarmupConfig(traces=0)
    with pytest.raises(ValueError):
        lib.TraceMix(wrong_code=0.8, guess=0.3)


def test_benchmark_warmup_is_bit_reproducible(tmp_path):
    from benchmarks.warmup import ModelShape, WarmupConfig, warmup_checkpoint

    config = WarmupConfig(traces=24, epochs=1, batch_size=8, shape=ModelShape(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    records = []
    for name in ("a", "b"):
        model_dir = warmup_checkpoint(tmp_path / name, config)
        records.append(json.loads((model_dir.parent / lib.RECORD).read_text()))
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(model_dir)
        assert lib.weights_sha256(loaded) == records[-1]["weights_sha256"]
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    assert records[0]["config"]["threads"] == 1
    # The cache is reused as is; another config for the same directory is refused.
    before = (tmp_path / "a" / "warmup" / lib.RECORD).stat().st_mtime_ns
    warmup_checkpoint(tmp_path / "a", config)
    assert (tmp_path / "a" / "warmup" / lib.RECORD).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="another warm-up config"):
        warmup_checkpoint(tmp_path / "a", WarmupConfig(traces=25, epochs=1, batch_size=8))


def test_warm_up_trains_in_place_and_reuses_its_checkpoint(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model(0, tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    start = lib.weights_sha256(model)
    config = lib.WarmupConfig(traces=16, epochs=1, batch_size=8, lr=1e-3, threads=1)
    model_dir = lib.warm_up(model, tokenizer, config, tmp_path / "warmup")
    record = json.loads((tmp_path / "warmup" / lib.RECORD).read_text())
    assert record["weights_sha256"] == lib.weights_sha256(model) != start
    assert record["traces"]["traces"] == 16 and record["config"]["kinds"] == list(config.kinds)
    assert (model_dir / "config.json").is_file()
    fresh = tiny_model(0, tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    lib.warm_up(fresh, tokenizer, config, tmp_path / "warmup")  # cached: left untouched
    assert lib.weights_sha256(fresh) == start
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()


def test_traces_train_only_assistant_tokens():
    tokenizer = tiny_tokenizer()
    traces, stats = lib.make_traces(tokenizer, 12, kinds=("nth_prime",), seed=3)
    assert stats["traces"] == 12 == len(traces)
    assert stats["correct_code"] + stats["wrong_code"] + stats["guess"] == 12
    for ids, mask in traces:
        assert len(ids) == len(mask) and mask[0] == 0 and mask[-1] == 1
        assert ids[-1] == tokenizer.eos_token_id
        trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
        assert "```output" not in trained and "\\boxed{" in trained


def test_bootstrap_interval_over_problems():
    def records(scores):
        return [{"problem_id": f"p{i}", "correct": c, "infra_error": False}
                for i, row in enumerate(scores) for c in row]

    low, high = bootstrap_pass1(records([[1, 1]] * 10))
    assert low == high == 1.0
    mixed = records([[1, 0]] * 10 + [[0, 0]] * 10)
    low, high = bootstrap_pass1(mixed)
    assert 0.0 <= low < 0.25 < high <= 0.5
    same = bootstrap_pass1(mixed, mixed)
    assert same == (0.0, 0.0)
    with pytest.raises(ValueError, match="same problems"):
        bootstrap_pass1(mixed, records([[1]] * 3))


def test_train_top_layers_freezes_the_rest():
    model = tiny_model(0, tiny_tokenizer(), num_hidden_layers=3)
    count = train_top_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.norm.")) for n in trainable)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError):
        train_top_layers(model, 4)


def test_tir_train_with_warmup_reports_every_stage(tmp_path):
    from algos.cli import app

    model = save_tiny(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = ["train", "--model", str(model), "--run-dir", str(run_dir), "--iterations", "1",
            "--eval-problems", "4", "--eval-samples", "2", "--no-progress", "--threads", "1",
            "--train-layers", "2",
            "--set", "prompts_per_iteration=2", "--set", "group_size=2",
            "--set", "minibatch_size=4", "--set", "grad_accum_steps=2",
            "--set", "rollout.max_new_tokens=16",
            "--set", "warmup.traces=16", "--set", "warmup.lr=1e-3", "--set", "warmup.threads=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    for stage in ("before", "after_warmup", "after"):
        assert report[stage]["problems"] == 4 and report[stage]["samples"] == 8
        low, high = report[stage]["pass@1_ci95"]
        assert low <= report[stage]["pass@1"] <= high
        assert "tool_call_rate" in report[stage]
    assert report["eval"]["problems"] == lib.heldout_ids(("digit_sum", "nth_prime"), 2)
    assert report["warmup"]["config"]["traces"] == 16 and report["warmup"]["weights_sha256"]
    assert "ci95_paired" in report["rl_gain_over_after_warmup"]
    assert report["trainable_parameters"] < sum(
        p.numel() for p in tiny_model(0, tiny_tokenizer()).parameters())
    assert set(report["phases_s"]) >= {"warmup_s", "rl_s", "eval_before_s"}

    # A resumed run reuses the warm-up and the cached evaluations.
    record = run_dir / "warmup" / lib.RECORD
    stamp = record.stat().st_mtime_ns
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert record.stat().st_mtime_ns == stamp
    assert json.loads((run_dir / "report.json").read_text())["before"] == report["before"]

    bad = CliRunner().invoke(app, ["train", "--model", str(model), "--env", "TIR-GSM8K-v0",
                                   "--warmup", "--run-dir", str(tmp_path / "other")])
    assert bad.exit_code != 0 and "--warmup needs --env TIR-Math-v0" in " ".join(bad.output.split())
