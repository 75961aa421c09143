"""Data-parallel training on real gloo process groups: torchrun starts 2 CPU processes.

Each launch costs ~30 s of imports on a loaded 2-core machine, so one launch runs several cases
(``tests/distributed_worker.py``). A hang (a rank left out of an all-reduce) shows as the
launch overrunning its deadline, and the test kills the process group it started.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from algos.cli import app
from algos.distributed import reduce_metrics, torchrun_command
from algos.tiny import save_tiny
from tests.distributed_worker import CONFIGS, make_agent, make_case, run_update

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DEADLINE_S = 420


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``args`` in a session of its own; past the deadline kill the session and fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no exit within {LAUNCH_DEADLINE_S} s (a rank hangs?):\n{out[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out)


def torchrun(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", "-m", module, *args], cwd)


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def initial_weights(case: dict) -> dict:
    config = CONFIGS[case["algo"]](**case["config"])
    return make_agent(case["algo"], config).trainable.state_dict()


CASES = [
    make_case("token_mean"),
    make_case("seq_mean", loss_aggregation="seq_mean"),
    make_case("ppo", algo="ppo", whiten_advantages=False),  # whitening is per rank
    make_case("rank1_flat", flat_groups=(1,)),
    make_case("rank1_dropped", flat_groups=(1,), zero_variance_groups="drop"),
    make_case("all_flat", flat_groups=(0, 1)),
]


@pytest.fixture(scope="module")
def two_ranks_dir(tmp_path_factory) -> Path:
    """What both ranks of one 2-process launch of the worker wrote."""
    out = tmp_path_factory.mktemp("ranks")
    torch.save(CASES, out / "cases.pt")
    result = torchrun("tests.distributed_worker", str(out / "cases.pt"), str(out))
    assert result.returncode == 0, result.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(two_ranks_dir):
    """Every case's weights and metrics from both ranks."""
    return {case["name"]: [torch.load(two_ranks_dir / f"{case['name']}-rank{r}.pt")
                           for r in (0, 1)] for case in CASES}


# Tolerance: both ranks hold identical all-reduced gradients, so their weights must be equal
# bit for bit. Against one process the gradient is the same sum taken in another order (two
# partial sums all-reduced instead of one sum over micro-batches): float32 rounding, ~1e-7 of
# the terms summed. AdamW steps by lr * m / (sqrt(v) + 1e-8), which amplifies that rounding where
# an entry's terms nearly cancel: a gradient of 1e-9 off by 1e-10 moves the step by
# lr * 1e-10 / 1.1e-8, ~1e-5 of lr. So weights may differ by up to ~1e-5 x lr per step (3.3e-6
# measured over 2 steps at lr 1e-3), while a wrong divisor (per-rank token counts, ~4x apart
# here) tilts the step's direction and moves weights by O(lr) = 1e-3.
WEIGHTS_ATOL = 2e-5


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["token_mean", "seq_mean", "ppo", "rank1_flat",
                                  "rank1_dropped"])
def test_two_ranks_take_the_update_of_one_process_on_the_whole_batch(two_ranks, name):
    """2 ranks with one group each take the update one process takes with both groups: the
    loss divisor is all-reduced (group 0's turns are ~4x longer than group 1's, so per-rank
    divisors would weight the groups differently). In the flat cases rank 1 has nothing to
    train on (rows skipped or dropped) and still joins every all-reduce. PPO's value loss
    shares the divisor, and its value head trains under DDP beside the policy."""
    case = next(c for c in CASES if c["name"] == name)
    (rank0, rank1) = two_ranks[name]
    single, single_metrics = run_update(case)
    tokens = case["batch"].loss_mask.sum(1)
    assert tokens[:4].sum() > 3 * tokens[4:].sum()

    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    assert max_difference(rank0["state"], initial_weights(case)) > 1e-3, "the update moved nothing"
    assert max_difference(rank0["state"], single) < WEIGHTS_ATOL
    assert rank0["metrics"]["update/steps"] == rank1["metrics"]["update/steps"] == 2
    assert single_metrics["update/steps"] == 2
    # 2 epochs x 2 micro-batches of rank 0's 4 rows; an idle rank 1 runs as many
    assert rank0["metrics"]["update/micro_steps"] == rank1["metrics"]["update/micro_steps"] == 4
    idle = name.startswith("rank1_")
    assert (rank1["metrics"]["update/rows_forward"] == 0) == idle


@pytest.mark.timeout(600)
def test_ranks_holding_different_weights_are_caught(two_ranks_dir):
    """A rank whose weights moved on its own (an unshared load) is refused on every rank."""
    assert all(torch.load(two_ranks_dir / f"diverged-rank{r}.pt") for r in (0, 1))


@pytest.mark.timeout(600)
def test_no_rank_steps_when_no_rank_has_signal(two_ranks):
    initial = initial_weights(next(c for c in CASES if c["name"] == "all_flat"))
    for rank in two_ranks["all_flat"]:
        assert rank["metrics"]["update/steps"] == 0
        assert max_difference(rank["state"], initial) == 0


def test_torchrun_command_runs_this_command_line_without_nproc():
    command = torchrun_command(3, ["train", "--nproc", "3", "--set", "lr=1", "--nproc=3", "-v"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           "-m", "algos.cli", "train", "--set", "lr=1", "-v"]


def test_torchrun_passes_every_tir_train_option_through():
    """torchrun's parser accepts abbreviations of its own options; none of ``tir train``'s may
    be taken for one (``--nproc`` was, for ``--nproc-per-node``: the command drops it)."""
    import typer.main
    from torch.distributed.run import get_args_parser

    train = typer.main.get_command(app).commands["train"]
    argv = ["train"]
    for param in train.params:
        for name in param.opts + param.secondary_opts:
            argv += [name] if param.is_flag else [name, "1"]
    command = torchrun_command(2, argv)
    parsed = get_args_parser().parse_args(command[3:])
    assert parsed.nproc_per_node == "2" and parsed.module and parsed.training_script == "algos.cli"
    assert parsed.training_script_args == [a for i, a in enumerate(argv)
                                           if a != "--nproc" and argv[i - 1] != "--nproc"]


def test_metrics_reduce_across_ranks():
    ranks = [
        {"reward/mean": 1.0, "reward/std": 0.0, "tokens/generated": 10, "time/update_s": 2.0,
         "loss/pg_loss": 0.5},
        {"reward/mean": 3.0, "reward/std": 0.0, "tokens/generated": 30, "time/update_s": 5.0,
         "loss/pg_loss": 1.5},
    ]
    out = reduce_metrics(ranks)
    assert out["tokens/generated"] == 40 and out["time/update_s"] == 5.0
    assert out["reward/mean"] == 2.0 and out["loss/pg_loss"] == 1.0
    assert math.isclose(out["reward/std"], 1.0)  # rewards 1,1,...,3,3: pooled std 1
    assert reduce_metrics(ranks[:1]) == ranks[0]


TINY_RUN = ["--no-progress", "--threads", "1", "--eval-problems", "2",
            "--warmup", "--set", "warmup.traces=4", "--set", "warmup.batch_size=4",
            "--set", "prompts_per_iteration=2", "--set", "group_size=2",
            "--set", "minibatch_size=2", "--set", "grad_accum_steps=1",
            "--set", "rollout.max_new_tokens=16", "--set", "rollout.max_turns=2",
            "--set", "rollout.max_total_tokens=768"]


@pytest.mark.timeout(1200)
def test_tir_train_nproc_2_checkpoints_and_resumes(tmp_path):
    """``tir train --nproc 2`` runs one iteration on 2 processes, rank 0 alone warms the model
    up (the other loads its checkpoint; ``learn`` checks the ranks' weights agree), evaluates,
    logs and checkpoints; a second ``--nproc 2`` run resumes from that checkpoint."""
    model, run_dir = save_tiny(tmp_path / "tiny"), tmp_path / "run"
    base = [sys.executable, "-m", "algos.cli", "train", "--nproc", "2", "--algo", "grpo",
            "--model", str(model), "--run-dir", str(run_dir), *TINY_RUN]

    first = launch([*base, "--iterations", "1"], ROOT)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "training grpo for 1 iterations on 2 processes" in first.stdout
    assert first.stdout.count("evaluating on 2 held-out problems") == 3  # rank 0 alone
    assert first.stdout.count("warm-up: 4 traces") == 1
    [row] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["iteration"] == 1
    assert row["update/rows_in_loss"] == 4  # 2 ranks x 1 prompt x 2 samples, summed
    assert (run_dir / "checkpoints" / "iter_000001" / "trainer.pt").is_file()
    assert json.loads((run_dir / "report.json").read_text())["processes"] == 2

    second = launch([*base, "--iterations", "2", "--resume"], ROOT)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "(resumed at 1) on 2 processes" in second.stdout
    assert second.stdout.count("evaluating on 2 held-out problems") == 1  # the others cached
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert (run_dir / "checkpoints" / "iter_000002" / "trainer.pt").is_file()


def test_two_nodes_train_as_one_group(tmp_path):
    """README's multi-node line, with two torchrun agents standing in for two nodes: each starts
    one process and they meet at a c10d rendezvous on loopback, then train one iteration."""
    model, run_dir = save_tiny(tmp_path / "tiny"), tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_id", "tir-test",
         "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "algos.cli", "train", "--algo", "grpo",
         "--model", str(model), "--run-dir", str(run_dir), "--iterations", "1", *TINY_RUN],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=LAUNCH_DEADLINE_S)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
        pytest.fail(f"two nodes did not finish within {LAUNCH_DEADLINE_S} s (a rank hangs?)")
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "training grpo for 1 iterations on 2 processes" in outputs[0]
    [row] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["update/rows_in_loss"] == 4  # 2 nodes x 1 prompt x 2 samples, summed
    assert json.loads((run_dir / "report.json").read_text())["processes"] == 2


@pytest.mark.parametrize("sets, message", [
    (["prompts_per_iteration=3"], "prompts_per_iteration (3) must be a multiple of the 2 processes"),
    (["minibatch_size=4", "grad_accum_steps=4"], "minibatch_size (4) must be a multiple of "
                                                 "grad_accum_steps x processes (4 x 2)"),
])
def test_nproc_refuses_a_batch_it_cannot_split_before_starting_processes(sets, message, tmp_path):
    """Whole groups per rank, whole micro-batches per rank's share: checked before torchrun."""
    args = ["train", "--nproc", "2", "--algo", "grpo", "--model", str(tmp_path / "none"),
            "--run-dir", str(tmp_path / "run"), *TINY_RUN]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run").exists()
