"""The ``tir`` command end to end on a tiny model directory, and its refusals of bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from algos.cli import app
from algos.tiny import save_tiny

TINY_RUN = ["--iterations", "1", "--eval-problems", "2", "--no-progress", "--no-warmup",
            "--set", "prompts_per_iteration=2", "--set", "group_size=2",
            "--set", "minibatch_size=2", "--set", "grad_accum_steps=1",
            "--set", "rollout.max_new_tokens=16", "--set", "rollout.max_turns=2",
            "--set", "rollout.max_total_tokens=768"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_train_writes_report_model_and_curves(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--algo", "grpo", "--model", str(tiny_dir), "--run-dir", str(run_dir),
              *TINY_RUN],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["before"]["problems"] == 2 and report["after"]["problems"] == 2
    assert report["config"]["prompts_per_iteration"] == 2
    assert report["rollout"]["max_new_tokens"] == 16
    assert (run_dir / "curves.png").stat().st_size > 0
    assert (run_dir / "final" / "config.json").is_file()
    assert "pass@1" in result.output

    again = CliRunner().invoke(app, ["train", "--algo", "grpo", "--model", str(tiny_dir),
                                     "--run-dir", str(run_dir), *TINY_RUN])
    assert again.exit_code == 2 and "--resume" in again.output


def test_train_on_the_continuous_batching_backend(tiny_dir, tmp_path):
    from algos.metrics import read_metrics

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--algo", "gtpo", "--model", str(tiny_dir),
                                      "--run-dir", str(run_dir), "--backend", "hf-continuous",
                                      *TINY_RUN])
    assert result.exit_code == 0, result.output
    [metrics] = read_metrics(run_dir / "metrics.jsonl")
    assert metrics["infra_error_rate"] == 0 and metrics["tokens/generated"] > 0
    assert json.loads((run_dir / "report.json").read_text())["after"]["problems"] == 2


def test_eval_gives_one_summary_on_either_local_backend(tiny_dir, tmp_path):
    summaries = {}
    for backend in ("hf", "hf-continuous"):
        out = tmp_path / f"{backend}.json"
        result = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--limit", "3",
                                          "--max-new-tokens", "16", "--max-turns", "2",
                                          "--backend", backend, "--out", str(out)])
        assert result.exit_code == 0, result.output
        summaries[backend] = json.loads(out.read_text())
        assert summaries[backend].pop("backend") == backend
    assert summaries["hf"]["problems"] == 3 and summaries["hf"]["infra_errors"] == 0
    assert summaries["hf"] == summaries["hf-continuous"]  # greedy: the same episodes


@pytest.mark.parametrize("args, message", [
    (["--backend", "hf-continuous", "--set", "rollout.top_p=0.9"], "top-p truncation"),
    (["--set", "no_such_knob=1"], "has no field 'no_such_knob'"),
    (["--set", "lr=-1"], "lr must be > 0"),
    (["--set", "lr=fast"], "expected float"),
    (["--set", "rollout.max_new_tokens=0"], "max_new_tokens"),
    (["--algo", "dqn"], "unknown algorithm"),
    (["--env", "CartPole-v1"], "not a TIR env"),
    (["--model", "/no/such/model"], "does not exist"),
])
def test_bad_input_is_refused_before_any_work(args, message, tiny_dir, tmp_path):
    base = ["train", "--model", str(tiny_dir), "--run-dir", str(tmp_path / "run"),
            "--iterations", "1", "--no-progress"]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_config_file_and_overrides(tiny_dir, tmp_path):
    from algos.cli import build_configs

    config_file = tmp_path / "run.toml"
    config_file.write_text('lr = 3e-5\nshaping = false\n[rollout]\nmax_turns = 3\n')
    config, rollout = build_configs("gtpo", config_file, ["lr=1e-4", "rollout.temperature=0.7"], {})
    assert config.lr == 1e-4 and config.shaping is False
    assert rollout.max_turns == 3 and rollout.temperature == 0.7


def test_data_check_reports_fields_prompts_golds_and_ids(tmp_path):
    path = tmp_path / "mwp.jsonl"
    path.write_text(json.dumps({"Body": "Paul painted 9 pictures on Monday and 4 on Tuesday.",
                                "Question": "How many pictures did he paint total?",
                                "Answer": "13 (pictures)", "ID": "p1"}) + "\n"
                    + json.dumps({"Body": "b", "Question": "q?", "Answer": "['-3,0']",
                                  "ID": "p2"}) + "\n")
    result = CliRunner().invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "2 problems" in result.output and "question=Body+Question answer=Answer" in result.output
    assert "Paul painted 9 pictures on Monday and 4 on Tuesday. How many" in result.output
    assert "gold: 13" in result.output and "1/2 self-grade" in result.output
    assert "file/p2: \"['-3,0']\" is a Python list repr" in result.output
    assert "file/p1" in result.output and "problems (all)" in result.output


def test_data_check_refuses_an_ambiguous_file(tmp_path):
    path = tmp_path / "ambiguous.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "prompt": "hi", "answer": 4}) + "\n")
    result = CliRunner().invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 1
    assert "ambiguous layout" in result.output and "'question', 'prompt'" in result.output
