"""GTPO vs GRPO vs PPO, with GTPO's ablations and stabilisers, at a scale 2 CPU cores can answer.

The paper's question (arXiv 2511.14846: GTPO +3.0 points over GRPO) asked of a tiny model on a
narrow TIR task (``benchmarks/warmup.py``). One deterministic warm-up checkpoint (its weights'
sha256 is recorded) is the start of every run, and every run gets the same budget: the same
samples per iteration, the same optimizer steps (one epoch of the same minibatches, PPO too) and
the same evaluation. Two phases:

1. ``sweep``: each base algorithm (GTPO, GRPO, PPO) at several learning rates, scored on the
   validation problems (``algos.warmup.heldout_ids(..., split="validation")``); the best rate
   of each is kept. Nothing is tuned on the test problems.
2. ``main``: every method at its algorithm's best rate, several seeds, scored on the test
   problems. Seed k of every method starts from the same checkpoint, samples the same first
   prompts and evaluates with the same sampling seed, so differences are paired by seed.

Findings picked from the first seeds are retested on later ones (``CONFIRMATION``): the report's
confirmatory section counts only those seeds, with Holm's correction over its tests.

    python benchmarks/compare.py             # sweep, then the main comparison (resumable)
    python benchmarks/compare.py --smoke     # minutes, into a temp dir: a check, not a result
    python benchmarks/compare.py --phase main --seeds 10 \
        --methods gtpo gtpo+drop-flat-groups gtpo+clip-higher   # the confirmatory seeds 5-9
    python benchmarks/compare.py --report-only --seeds 10     # the report over every method

Held-out accuracy is pass@1 sampled at temperature 1 (the policy RL trains, not its greedy mode),
8 samples of each of 64 problems. A run's score is the mean of its last 3 evaluations, which
averages out the noise of any single one.

Each run is one file under ``runs/``, written when it ends; rerunning reads finished runs back
and does only the missing ones. Every invocation that ran something appends its wall time and
load to ``sessions.jsonl``, so the report states what the whole comparison cost. Writes
``results.json``, ``compare.md`` and ``curves.png`` into the output directory (default
``benchmarks/results/compare/``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from algos.evaluation.provenance import (  # noqa: E402
    LoadSampler,
    append_sessions,
    git_commit,
    machine_info,
    now,
    read_sessions,
)
from algos.warmup import heldout_ids  # noqa: E402
from benchmarks.warmup import (  # noqa: E402
    KINDS,
    SYSTEM_PROMPT,
    WarmupConfig,
    train_problems,
    warmup_checkpoint,
)

logger = logging.getLogger("benchmarks.compare")

BASE = ("gtpo", "grpo", "ppo")
"""The algorithms whose learning rate the sweep picks; every other method uses its base's."""

METHODS: dict[str, tuple[str, dict]] = {
    "gtpo": ("gtpo", {}),
    # The paper's GRPO baseline: min(accuracy, format) per trajectory, binary format term.
    "grpo": ("grpo", {"trajectory_reward": "min_acc_format"}),
    # PPO's baseline is its critic: the same trajectories per iteration, as distinct prompts.
    "ppo": ("ppo", {}),
    # GTPO without each of its ideas, and the other readings of its normalisation.
    "gtpo-scope-group": ("gtpo", {"norm_scope": "group"}),
    "gtpo-scope-global": ("gtpo", {"norm_scope": "global"}),
    "gtpo-gamma1": ("gtpo", {"gamma": 1.0}),
    "gtpo-no-turn-rewards": ("gtpo", {"turn_rewards": False}),
    "gtpo-no-shaping": ("gtpo", {"shaping": False}),
    # GRPO with the summed format penalty instead of the paper's binary format term.
    "grpo-penalty": ("grpo", {"trajectory_reward": "min_acc_penalty"}),
    # Stabilisers on top of GTPO.
    "gtpo+void-filter": ("gtpo", {"void_turn_filter": True}),
    "gtpo+drop-flat-groups": ("gtpo", {"zero_variance_groups": "drop"}),
    "gtpo+clip-higher": ("gtpo", {"clip_high": 0.28}),
    "gtpo+kl": ("gtpo", {"kl_coef": 0.01}),
    "gtpo+lr-warmup": ("gtpo", {"lr_warmup_steps": 10}),
    "gtpo-no-grad-clip": ("gtpo", {"max_grad_norm": 1e6}),
}
"""Method name -> (registered algorithm, config overrides on top of ``Budget``'s shared ones).
``gtpo-no-grad-clip``'s bound of 1e6 is far above any gradient norm these runs see."""


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """Exploratory findings retested on fresh seeds: each ``(a, b)`` test is the paired
    difference ``a - b`` over ``seeds`` alone, with Holm's correction over the tests at ``alpha``.
    A finding picked because it looked best on some seeds is biased upwards on them; only seeds
    that played no part in picking it can confirm it."""

    tests: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...]
    alpha: float = 0.05


CONFIRMATION = Confirmation(
    tests=(("gtpo+drop-flat-groups", "gtpo"), ("gtpo+clip-higher", "gtpo")),
    seeds=(5, 6, 7, 8, 9),
)
"""Registered before seeds 5-9 ran: on seeds 0-4 these two stabilisers' intervals against GTPO
excluded 0 (p 0.029 and 0.020), but not after Holm's correction over all six stabilisers."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every run gets: the same samples, optimizer steps and evaluation."""

    iterations: int = 20
    prompts: int = 8
    group_size: int = 4
    """Samples per prompt (GRPO/GTPO groups). PPO draws prompts x group_size distinct prompts."""
    minibatch_size: int = 16
    update_epochs: int = 1
    """One pass for every method, so each takes batch / minibatch_size = 2 steps an iteration."""
    eval_at: tuple[int, ...] = (10, 15, 20)
    """Iterations after which held-out accuracy is measured (iteration 0 too, once per seed)."""
    scored_evals: int = 3
    """A run's score: the mean pass@1 of its last this-many evaluations."""
    heldout_per_kind: int = 32
    eval_samples: int = 8
    max_new_tokens: int = 64
    max_turns: int = 2
    max_total_tokens: int = 320
    sweep_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    sweep_seeds: int = 1
    sweep_eval_samples: int = 4
    """Samples per validation problem in the sweep: it only has to rank rates, at half the cost."""
    seeds: int = 5

    def config(self, method: str, seed: int, lr: float):
        """The algorithm config of ``method`` for ``seed`` at learning rate ``lr``."""
        from algos.config import GRPOConfig, GTPOConfig, PPOConfig

        algo, overrides = METHODS[method]
        shared = dict(seed=seed, lr=lr, minibatch_size=self.minibatch_size, grad_accum_steps=1,
                      update_epochs=self.update_epochs, **overrides)
        if algo == "ppo":
            return PPOConfig(prompts_per_iteration=self.prompts * self.group_size, group_size=1,
                             **shared)
        config_class = GTPOConfig if algo == "gtpo" else GRPOConfig
        return config_class(prompts_per_iteration=self.prompts, group_size=self.group_size,
                            **shared)

    def run_key(self) -> dict:
        """What a run's result depends on: everything but the seed counts and the sweep's
        grid, so a comparison can be extended and keep its finished runs."""
        key = dataclasses.asdict(self)
        for name in ("seeds", "sweep_seeds", "sweep_lrs"):
            del key[name]
        return json.loads(json.dumps(key))  # as it reads back from a record (tuples as lists)

    def eval_points(self) -> list[int]:
        return [0, *self.eval_at]


# Sized from probes on the shared 2-core machine (2026-12-05, 1 thread per run, load ~2): one
# evaluation of 64 problems x 8 samples ~60-70 s, one training iteration ~5-8 s (PPO ~12 s).
# Measured end to end on a quiet machine (2026-12-06, results/compare_rerun): the sweep and nine
# methods x 5 seeds, 54 runs two at a time, took 1.9 h; a run 236 s median.
DEFAULT = (Budget(), WarmupConfig())
SMOKE = (
    Budget(iterations=2, prompts=2, group_size=2, minibatch_size=4, eval_at=(1, 2),
           scored_evals=2, heldout_per_kind=1, eval_samples=1, max_new_tokens=32,
           sweep_lrs=(1e-4, 1e-3), sweep_eval_samples=1, seeds=2),
    WarmupConfig(traces=32, epochs=1),
)

TRAIN_KEYS = ("reward/mean", "accuracy", "turns/mean", "tool_call_rate", "exec_error_rate",
              "groups/all_correct", "groups/no_signal", "adv/correct_code_turns_negative",
              "void_rate", "update/steps", "grad_norm", "time/rollout_s", "time/update_s")
EVAL_KEYS = ("pass@1", "mean_turns", "tool_call_rate", "code_error_rate", "samples")


# ------------------------------------------------------------------------------------ runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a method at a learning rate and seed, scored on a split."""

    phase: str  # sweep | main
    method: str
    seed: int
    lr: float

    @property
    def split(self) -> str:
        return "validation" if self.phase == "sweep" else "test"

    def path(self, out: Path) -> Path:
        lr = f"/lr{self.lr:g}" if self.phase == "sweep" else ""
        return out / "runs" / self.phase / f"{self.method}{lr}" / f"seed{self.seed}.json"


def write_json(path: Path, payload: dict) -> None:
    """Atomically: a run killed mid-write leaves no file, so it is redone, never half-read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def read_finished(path: Path, budget: Budget, lr: float | None = None) -> dict | None:
    """A finished run's record, if it was made with this budget (and learning rate); another
    budget or rate is an error, not a silent reuse."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record["budget"] != budget.run_key():
        raise ValueError(f"{path} was made with another budget ({record['budget']}); "
                         "use another --out or delete it")
    if lr is not None and "lr" in record and record["lr"] != lr:
        raise ValueError(f"{path} was trained at lr {record['lr']}, not {lr}; "
                         "the sweep chose another rate: delete it to rerun")
    return record


def problems(budget: Budget, split: str) -> list[str]:
    return heldout_ids(KINDS, budget.heldout_per_kind, split)


def evaluate(agent, budget: Budget, split: str) -> dict:
    samples = budget.sweep_eval_samples if split == "validation" else budget.eval_samples
    summary = agent.evaluate(problems(budget, split), samples=samples, temperature=1.0)
    return {key: summary[key] for key in EVAL_KEYS}


def start_eval(agent, out: Path, seed: int, budget: Budget, split: str) -> dict:
    """Held-out accuracy of the warm-up model with seed ``seed``'s sampling: the same for every
    method, so it is measured once per (split, seed) and shared."""
    path = out / "runs" / "start" / split / f"seed{seed}.json"
    record = read_finished(path, budget)
    if record is None:
        record = {"budget": budget.run_key(), "eval": evaluate(agent, budget, split)}
        write_json(path, record)
    return record["eval"]


def score(curve: list[dict], budget: Budget) -> dict:
    """A run's numbers from its evaluations: the score (mean of the last ``scored_evals``),
    the peak, and the code-error rate over the scored evaluations."""
    scored = curve[-budget.scored_evals:]
    return {
        "final": float(np.mean([p["pass@1"] for p in scored])),
        "peak": max(p["pass@1"] for p in curve[1:]),
        "code_error_rate": float(np.mean([p["code_error_rate"] for p in scored])),
    }


def train_run(run: Run, checkpoint: str, out: str, budget: Budget, threads: int,
              model_dir: str | None = None) -> dict:
    """One run from the warm-up checkpoint; its record is written to ``runs/``, or, when
    ``model_dir`` is given, beside the final model saved there (a rerun of a finished run)."""
    import torch

    import algos
    from algos.rollout import RolloutConfig

    torch.set_num_threads(threads)
    out_dir = Path(out)
    started = time.perf_counter()
    rollout = RolloutConfig(max_new_tokens=budget.max_new_tokens, max_turns=budget.max_turns,
                            max_total_tokens=budget.max_total_tokens, temperature=1.0)
    torch.manual_seed(run.seed)  # PPO's value head is initialised here
    algo = METHODS[run.method][0]
    config = budget.config(run.method, run.seed, run.lr)
    with algos.make(algo, checkpoint, "TIR-Math-v0", config, rollout=rollout,
                    env_kwargs={"problems": train_problems(), "system_prompt": SYSTEM_PROMPT}) as agent:
        curve = [{"iteration": 0, **start_eval(agent, out_dir, run.seed, budget, run.split)}]
        train = []
        points = set(budget.eval_at)
        for iteration in range(1, budget.iterations + 1):
            metrics = agent.train_iteration()
            agent.log(metrics)
            train.append({"iteration": iteration, **{k: metrics.get(k) for k in TRAIN_KEYS}})
            if iteration in points:
                curve.append({"iteration": iteration, **evaluate(agent, budget, run.split)})
                logger.info("%s %s lr %g seed %d iteration %d: %s pass@1 %.3f", run.phase,
                            run.method, run.lr, run.seed, iteration, run.split,
                            curve[-1]["pass@1"])
        if model_dir is not None:
            agent.save(model_dir)
    record = {
        **dataclasses.asdict(run), "algo": algo, "split": run.split, "budget": budget.run_key(),
        "config": config.to_dict(), "curve": curve, "train": train, **score(curve, budget),
        "start": curve[0]["pass@1"], "seconds": time.perf_counter() - started,
        "load_average_1min_end": os.getloadavg()[0],
    }
    write_json(Path(model_dir) / "run.json" if model_dir else run.path(out_dir), record)
    return record


def _worker_init(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_all(todo: list[Run], checkpoint: Path, out: Path, budget: Budget, jobs: int,
            threads: int, report_only: bool = False) -> tuple[dict[Run, dict], int]:
    """Every run, ``jobs`` at a time in fresh processes (``jobs=1``: here); finished ones are
    read back instead (and, with ``report_only``, only those). Returns the records and how many
    runs this call made."""
    records: dict[Run, dict] = {}
    missing = []
    for run in todo:
        record = read_finished(run.path(out), budget, run.lr)
        if record is None:
            missing.append(run)
        else:
            records[run] = record
    logger.info("%d runs finished before, %d to do", len(records), len(missing))
    if report_only:
        return records, 0

    def done(run: Run, record: dict) -> None:
        records[run] = record
        logger.info("run %d/%d done: %s %s lr %g seed %d, %s score %.3f in %.0f s",
                    len(records), len(todo), run.phase, run.method, run.lr, run.seed,
                    run.split, record["final"], record["seconds"])

    if jobs == 1:  # in this process: no worker start-up (a smoke run is mostly start-up)
        for run in missing:
            done(run, train_run(run, str(checkpoint), str(out), budget, threads))
        return records, len(missing)
    # spawn: each run gets a clean process (no forked torch thread pools or sandbox handles).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_worker_init,
        initargs=(logging.getLogger().level,),
    ) as pool:
        futures = {pool.submit(train_run, run, str(checkpoint), str(out), budget, threads): run
                   for run in missing}
        for future in concurrent.futures.as_completed(futures):
            done(futures[future], future.result())
    return records, len(missing)


def save_best_models(runs: dict[str, dict[int, dict]], checkpoint: Path, out: Path,
                     budget: Budget, models: Path, threads: int) -> dict[str, dict]:
    """Rerun each base algorithm's best-scoring seed and save its final model (for the
    leaderboard) under ``models/<method>/seed<k>``. At the record's code a run is deterministic
    (one thread, seeded), so the rerun should retrace its curve; one that does not (another code
    version, or tool output that varies) is reported, never hidden."""
    saved = {}
    for method in (m for m in BASE if m in runs):
        seed, record = max(runs[method].items(), key=lambda item: item[1]["final"])
        target = models / method / f"seed{seed}"
        rerun_path = target / "run.json"
        if rerun_path.is_file():
            rerun = json.loads(rerun_path.read_text())
        else:
            run = Run("main", method, seed, record["lr"])
            rerun = train_run(run, str(checkpoint), str(out), budget, threads, str(target))
        saved[method] = {"seed": seed, "model": str(target), "final": record["final"],
                         "rerun_final": rerun["final"],
                         "reproduced": rerun["curve"] == record["curve"]}
        log = logger.info if saved[method]["reproduced"] else logger.error
        log("%s seed %d: recorded score %.4f, rerun %.4f (%s) -> %s", method, seed,
            record["final"], rerun["final"],
            "identical curve" if saved[method]["reproduced"] else "DID NOT REPRODUCE", target)
    return saved


def sweep_runs(budget: Budget, algos: list[str]) -> list[Run]:
    return [Run("sweep", method, seed, lr) for seed in range(budget.sweep_seeds)
            for lr in budget.sweep_lrs for method in algos]


def best_lrs(records: dict[Run, dict]) -> dict[str, dict]:
    """Per base algorithm: each swept rate's validation score (mean over sweep seeds) and the
    best one."""
    table: dict[str, dict[float, list[float]]] = {}
    for run, record in records.items():
        table.setdefault(run.method, {}).setdefault(run.lr, []).append(record["final"])
    out = {}
    for method, by_lr in table.items():
        means = {lr: float(np.mean(v)) for lr, v in sorted(by_lr.items())}
        out[method] = {"validation": {f"{lr:g}": m for lr, m in means.items()},
                       "best_lr": max(means, key=means.get)}
    return out


def main_runs(budget: Budget, methods: list[str], lrs: dict[str, float], seeds: int,
              seeds_by_method: dict[str, int]) -> list[Run]:
    """Seed-major: a stopped comparison has every method at its first seeds."""
    return [Run("main", method, seed, lrs[METHODS[method][0]])
            for seed in range(seeds) for method in methods
            if seed < seeds_by_method.get(method, seeds)]


# ------------------------------------------------------------------------------------ report


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and the Student-t confidence interval of the mean (seeds are few: no bootstrap);
    no interval (None) from one value."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per method: score per seed, its mean and 95% t-interval, peak, the share of seeds that
    ended below their start, the code-error rate, and the mean curve."""
    summary = {}
    for method, by_seed in runs.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        rows = [by_seed[s] for s in seeds]
        finals = [r["final"] for r in rows]
        mean, low, high = t_interval(finals)
        iterations = [p["iteration"] for p in rows[0]["curve"]]
        curves = np.array([[p["pass@1"] for p in r["curve"]] for r in rows])
        summary[method] = {
            "seeds": seeds, "lr": rows[0]["lr"], "final": finals, "mean": mean,
            "ci95": [low, high], "start": float(np.mean([r["start"] for r in rows])),
            "peak": float(np.mean([r["peak"] for r in rows])),
            "below_start": float(np.mean([r["final"] < r["start"] for r in rows])),
            "code_error_rate": float(np.mean([r["code_error_rate"] for r in rows])),
            "curve": {"iteration": iterations, "mean": curves.mean(0).tolist(),
                      "min": curves.min(0).tolist(), "max": curves.max(0).tolist()},
            "seconds": [r["seconds"] for r in rows],
        }
    return summary


def paired_difference(runs: dict[str, dict[int, dict]], a: str, b: str) -> dict | None:
    """``a - b`` in score over the seeds both finished (paired: same start, prompts,
    evaluation seed)."""
    if a not in runs or b not in runs:
        return None
    seeds = sorted(set(runs[a]) & set(runs[b]))
    if not seeds:
        return None
    diffs = [runs[a][s]["final"] - runs[b][s]["final"] for s in seeds]
    mean, low, high = t_interval(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "ci95": [low, high]}


def confirm(runs: dict[str, dict[int, dict]], confirmation: Confirmation) -> list[dict]:
    """Each test of ``confirmation`` on its seeds that both methods finished: the paired
    difference, its two-sided paired t-test p-value and whether Holm's step-down procedure
    rejects "no difference" (``confirmed``; never before every seed has run)."""
    from scipy import stats

    rows = []
    for a, b in confirmation.tests:
        seeds = [s for s in confirmation.seeds if s in runs.get(a, {}) and s in runs.get(b, {})]
        if not seeds:
            continue
        diffs = [runs[a][s]["final"] - runs[b][s]["final"] for s in seeds]
        mean, low, high = t_interval(diffs)
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1 else float("nan")
        rows.append({"test": f"{a} - {b}", "seeds": seeds, "diffs": diffs, "mean": mean,
                     "ci95": [low, high], "p": p,
                     "complete": len(seeds) == len(confirmation.seeds)})
    rejecting = len(rows) == len(confirmation.tests) and all(r["complete"] for r in rows)
    for rank, row in enumerate(sorted(rows, key=lambda r: (np.isnan(r["p"]), r["p"]))):
        row["holm_threshold"] = confirmation.alpha / (len(confirmation.tests) - rank)
        rejecting = rejecting and row["p"] < row["holm_threshold"]
        row["confirmed"] = rejecting
    return rows


def verdict(diff: dict | None) -> str:
    """The honest sentence on GTPO vs GRPO, in points of held-out accuracy."""
    if diff is None:
        return "GTPO and GRPO were not both run, so there is no comparison to report."
    points = 100 * diff["mean"]
    n = len(diff["seeds"])
    if diff["ci95"][0] is None:
        return (f"GTPO - GRPO = {points:+.1f} points from a single seed: no interval, no claim "
                "(the paper reports +3.0).")
    low, high = (100 * v for v in diff["ci95"])
    if low > 0:
        claim = f"GTPO beats GRPO here by {points:+.1f} points"
    elif high < 0:
        claim = f"GTPO does worse than GRPO here, by {points:+.1f} points"
    else:
        claim = (f"GTPO does not measurably beat GRPO here: the difference is {points:+.1f} "
                 "points and its interval includes 0")
    return (f"{claim} (paired over {n} seeds, 95% t-interval [{low:+.1f}, {high:+.1f}]); "
            "the paper reports +3.0 points on math benchmarks with far larger models.")


def run_provenance(started: float, load_start: tuple[float, ...]) -> dict:
    """The machine record, with the load at this invocation's start and end."""
    return {**machine_info(("torch",)), "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()),
            "wall_seconds_this_invocation": time.perf_counter() - started}


def write_markdown(path: Path, results: dict, title: str) -> None:
    budget, machine, summary = results["budget"], results["machine"], results["summary"]
    warm = results["warmup"]
    n_problems = budget["heldout_per_kind"] * len(KINDS)
    lines = [
        f"# {title}", "",
        (f"Tiny Llama ({warm['parameters']:,} parameters) warmed up on {warm['traces']['traces']} "
         f"synthetic traces ({100 * warm['traces']['correct_rate']:.0f}% of them correct; weights "
         f"sha256 `{warm.get('weights_sha256', 'n/a')[:16]}`), then trained by each method for "
         f"{budget['iterations']} iterations x {budget['prompts']} prompts x "
         f"{budget['group_size']} samples (PPO: {budget['prompts'] * budget['group_size']} "
         f"prompts x 1), {budget['update_epochs']} epoch of {budget['minibatch_size']}-trajectory "
         f"minibatches each, on procedural kinds {', '.join(KINDS)}."),
        (f"Score: held-out pass@1 on {n_problems} test problems never trained on, "
         f"{budget['eval_samples']} samples each at temperature 1, averaged over the evaluations "
         f"after iterations {', '.join(map(str, budget['eval_at'][-budget['scored_evals']:]))}."),
        "",
        "## Learning rates (validation split)", "",
        "| algorithm | " + " | ".join(f"lr {lr:g}" for lr in budget["sweep_lrs"]) + " | chosen |",
        "|---|" + "---|" * (len(budget["sweep_lrs"]) + 1),
    ]
    for algo, row in results["lr_sweep"].items():
        cells = [f"{100 * row['validation'][f'{lr:g}']:.1f}" if f"{lr:g}" in row["validation"]
                 else "-" for lr in budget["sweep_lrs"]]
        lines.append(f"| {algo} | " + " | ".join(cells) + f" | {row['best_lr']:g} |")
    lines += [
        "", "## Test split", "",
        "| method | lr | seeds | start | score (mean) | 95% CI (t) | peak | ended below start "
        "| code errors | per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        low, high = row["ci95"]
        ci = "n/a" if low is None else f"[{100 * low:.1f}, {100 * high:.1f}]"
        per_seed = ", ".join(f"{100 * v:.1f}" for v in row["final"])
        lines.append(
            f"| {method} | {row['lr']:g} | {len(row['seeds'])} | {100 * row['start']:.1f} | "
            f"{100 * row['mean']:.1f} | {ci} | {100 * row['peak']:.1f} | "
            f"{100 * row['below_start']:.0f}% | {100 * row['code_error_rate']:.1f}% | {per_seed} |")
    lines += ["", "Accuracies in %.", "", f"**{results['verdict']}**", "",
              "Paired differences (same seeds): every method against GRPO, each GTPO variant "
              "against GTPO, and GTPO against GRPO on the same reward (grpo-penalty):", ""]
    for name, diff in results["paired"].items():
        if diff is not None and diff["ci95"][0] is not None:
            lines.append(f"- {name}: {100 * diff['mean']:+.1f} points, 95% CI "
                         f"[{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}] "
                         f"(paired over {len(diff['seeds'])} seeds)")
    if results["confirmation"]:
        seeds = CONFIRMATION.seeds
        lines += [
            "", f"## Confirmatory retest (seeds {seeds[0]}-{seeds[-1]})", "",
            "Registered in advance, on seeds that played no part in picking the tests; "
            f"Holm's correction over the {len(CONFIRMATION.tests)} tests at "
            f"{100 * CONFIRMATION.alpha:g}% (two-sided paired t-tests).", "",
            "| test | seeds | difference | 95% CI (t) | p | Holm threshold | confirmed |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in results["confirmation"]:
            low, high = row["ci95"]
            ci = "n/a" if low is None else f"[{100 * low:+.1f}, {100 * high:+.1f}]"
            verdict_cell = ("yes" if row["confirmed"] else
                            "no" if row["complete"] else "not yet: seeds missing")
            lines.append(f"| {row['test']} | {len(row['seeds'])} | {100 * row['mean']:+.1f} | "
                         f"{ci} | {row['p']:.3f} | {row['holm_threshold']:.3f} | "
                         f"{verdict_cell} |")
    lines += [
        "", "![learning curves](curves.png)", "",
        (f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
         f"report written at commit {machine['commit']}; {machine['date']}. Run time per run: "
         f"{results['seconds_per_run_median']:.0f} s median."), "",
        cost_sentence(results["sessions"]), "",
    ]
    path.write_text("\n".join(lines))


def cost_sentence(sessions: list[dict]) -> str:
    """What the comparison cost in wall time, over the invocations that ran it, and how busy
    the machine was meanwhile."""
    if not sessions:
        return "Wall time: not recorded (the runs predate the invocation log, sessions.jsonl)."
    wall = sum(s["wall_seconds"] for s in sessions)
    load = sum(s["load_1min"]["mean"] * s["wall_seconds"] for s in sessions) / wall
    warmup = " (the warm-up built in it too)" if any(s["warmup_built"] for s in sessions) else ""
    commits = ", ".join(dict.fromkeys(str(s["commit"]) for s in sessions))
    return (f"Wall time: {wall / 3600:.2f} h for {sum(s['runs'] for s in sessions)} runs"
            f"{warmup}, over {len(sessions)} invocation(s) at commit {commits}, "
            f"{sessions[-1]['jobs']} runs at a time with {sessions[-1]['threads']} torch thread "
            f"each. 1-minute load average {load:.1f} mean, "
            f"{max(s['load_1min']['max'] for s in sessions):.1f} max; the runs' own sandboxes "
            "count in it, so it exceeds the job count even on a machine with nothing else "
            "running.")


def plot(path: Path, summary: dict, title: str) -> None:
    """Held-out pass@1 against iteration: mean over seeds, min-max band; baselines, GTPO's
    ablations and its stabilisers in three panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("GTPO vs GRPO vs PPO", ("gtpo", "grpo", "ppo", "grpo-penalty")),
              ("GTPO ablations", ("gtpo", "gtpo-scope-group", "gtpo-scope-global",
                                  "gtpo-gamma1", "gtpo-no-turn-rewards", "gtpo-no-shaping")),
              ("GTPO stabilisers", ("gtpo", *[m for m in METHODS if m.startswith("gtpo+")],
                                    "gtpo-no-grad-clip"))]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    for ax, (name, methods) in zip(axes, panels):
        for method in methods:
            if method not in summary:
                continue
            c = summary[method]["curve"]
            line, = ax.plot(c["iteration"], [100 * v for v in c["mean"]], marker="o",
                            label=f"{method} (n={len(summary[method]['seeds'])})")
            ax.fill_between(c["iteration"], [100 * v for v in c["min"]],
                            [100 * v for v in c["max"]], color=line.get_color(), alpha=0.12)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test pass@1 (%), T=1; band = min-max over seeds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a minutes-long run into a temp dir (a check, not a result)")
    parser.add_argument("--out", type=Path, help="output dir (default: benchmarks/results/"
                        "compare, or a temp dir with --smoke)")
    parser.add_argument("--phase", choices=("sweep", "main", "all"), default="all",
                        help="sweep: learning rates on the validation split; main: methods on "
                        "the test split at the chosen rates (needs the sweep); all: both")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, help="seeds per method (default: the budget's)")
    parser.add_argument("--method-seeds", nargs="*", default=[], metavar="METHOD=N",
                        help="fewer seeds for some methods, e.g. gtpo+kl=3")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs finished so far; run nothing")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs in parallel, one process each (default 2: one per core)")
    parser.add_argument("--save-best-models", type=Path, metavar="DIR",
                        help="after the report, rerun the best seed of GTPO, GRPO and PPO and "
                        "save its final model under DIR (checked to reproduce its score)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: OpenMP threads thrash on a shared machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    started, started_at, load_start = time.perf_counter(), now(), os.getloadavg()
    budget, warmup = SMOKE if args.smoke else DEFAULT
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=args.seeds)
    seeds_by_method = {}
    for item in args.method_seeds:
        method, _, n = item.partition("=")
        if method not in METHODS or not n.isdigit():
            parser.error(f"--method-seeds takes METHOD=N with a known method, got {item!r}")
        seeds_by_method[method] = int(n)
    out = args.out or (Path(tempfile.gettempdir()) / "tir-compare-smoke" if args.smoke
                       else ROOT / "benchmarks" / "results" / "compare")
    out.mkdir(parents=True, exist_ok=True)
    title = ("Algorithm comparison (smoke run: not a result)" if args.smoke
             else "Algorithm comparison: GTPO vs GRPO vs PPO on a tiny TIR task")

    warmup_built = not (out / "warmup" / "model").is_dir()
    with LoadSampler() as load:
        checkpoint = warmup_checkpoint(out, warmup)
        swept = [m for m in BASE if any(METHODS[x][0] == m for x in args.methods)]
        sweep, ran = run_all(sweep_runs(budget, swept), checkpoint, out, budget, args.jobs,
                             args.threads, args.report_only)
        lr_sweep = best_lrs(sweep)
        runs: dict[str, dict[int, dict]] = {}
        if args.phase != "sweep":
            lrs = {algo: row["best_lr"] for algo, row in lr_sweep.items()}
            todo = main_runs(budget, args.methods, lrs, budget.seeds, seeds_by_method)
            finished, ran_main = run_all(todo, checkpoint, out, budget, args.jobs, args.threads,
                                         args.report_only)
            ran += ran_main
            for run, record in finished.items():
                runs.setdefault(run.method, {})[run.seed] = record
            runs = {m: dict(sorted(runs[m].items())) for m in args.methods if m in runs}
    if ran or warmup_built:
        append_sessions(out, [{
            "started": started_at, "wall_seconds": time.perf_counter() - started, "runs": ran,
            "warmup_built": warmup_built, "jobs": args.jobs, "threads": args.threads,
            "commit": git_commit(), "load_1min": load.summary()}])
    summary = summarize(runs)
    # Every method against GRPO (the paper's question), each GTPO variant against GTPO (what the
    # ablation or stabiliser changes), and GTPO against GRPO on GTPO's own reward (the summed
    # format penalty): what the turn-level credit adds when the reward is the same.
    paired = {f"{a} - grpo": paired_difference(runs, a, "grpo") for a in runs if a != "grpo"}
    paired.update({f"{a} - gtpo": paired_difference(runs, a, "gtpo") for a in runs
                   if a != "gtpo" and METHODS[a][0] == "gtpo"})
    if "gtpo" in runs and "grpo-penalty" in runs:
        paired["gtpo - grpo-penalty"] = paired_difference(runs, "gtpo", "grpo-penalty")
    results = {
        "title": title,
        "budget": dataclasses.asdict(budget),
        "warmup": json.loads((checkpoint.parent / "warmup.json").read_text()),
        "problems": {split: problems(budget, split) for split in ("validation", "test")},
        "sampling": (f"temperature 1, pass@1 from {budget.eval_samples} samples per test problem "
                     f"({budget.sweep_eval_samples} per validation problem)"),
        "methods": {m: dict(METHODS[m][1], algo=METHODS[m][0]) for m in args.methods},
        "lr_sweep": lr_sweep,
        "sweep_runs": {f"{r.method}/lr{r.lr:g}/seed{r.seed}": rec for r, rec in sweep.items()},
        "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()},
        "summary": summary,
        "paired": paired,
        "verdict": verdict(paired.get("gtpo - grpo")),
        "confirmation": confirm(runs, CONFIRMATION),
        "seconds_per_run_median": float(np.median(
            [r["seconds"] for r in sweep.values()]
            + [r["seconds"] for by_seed in runs.values() for r in by_seed.values()])),
        "machine": run_provenance(started, load_start),
        "sessions": read_sessions(out),
    }
    write_json(out / "results.json", results)
    write_markdown(out / "compare.md", results, title)
    plot(out / "curves.png", summary, title)
    print((out / "compare.md").read_text())
    logger.info("wrote %s", out)
    if args.save_best_models:
        results["best_models"] = save_best_models(runs, checkpoint, out, budget,
                                                  args.save_best_models, args.threads)
    return results


if __name__ == "__main__":
    main()
