"""GTPO vs GRPO vs PPO, and GTPO without each of its three ideas, at a scale 2 CPU cores can answer.

The paper's question (arXiv 2511.14846: GTPO +3.0 points over GRPO) asked of a tiny model on a
narrow TIR task (``benchmarks/warmup.py``): one shared warm-up checkpoint, then every method
trains from it with the same sample budget (iterations x prompts x samples per prompt) for
several seeds, and held-out accuracy is measured along the way.

    python benchmarks/compare.py             # the committed comparison (~40 min on 2 quiet cores)
    python benchmarks/compare.py --smoke     # minutes, into a temp dir: a check, not a result

Held-out accuracy is pass@1 sampled at temperature 1 (the policy RL trains, not its greedy mode:
the warm-up model's greedy answer is already its most common one), over fixed problems whose
seeds training never draws. Seed k of every method starts from the same checkpoint, samples the
same first prompts and evaluates with the same sampling seed, so differences between methods are
paired by seed.

Each (method, seed) run is one file under ``runs/``, written when the run ends; rerunning the
command reads finished runs back and does only the missing ones. Writes ``results.json``,
``compare.md`` and ``curves.png`` into the output directory
(default ``benchmarks/results/compare/``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.warmup import (
    KINDS,
    SYSTEM_PROMPT,
    TrainProblems,
    WarmupConfig,
    heldout_ids,
    warmup_checkpoint,
)

logger = logging.getLogger("benchmarks.compare")

METHODS: dict[str, tuple[str, dict]] = {
    "gtpo": ("gtpo", {}),
    "gtpo-no-turn-rewards": ("gtpo", {"turn_rewards": False}),
    "gtpo-gamma1": ("gtpo", {"gamma": 1.0}),
    "gtpo-no-shaping": ("gtpo", {"shaping": False}),
    # The paper's GRPO baseline: min(accuracy, format) per trajectory.
    "grpo": ("grpo", {"trajectory_reward": "min_acc_format"}),
    # PPO's baseline is its critic: the same trajectories per iteration as distinct prompts, and
    # its own default of 2 update epochs (a value head learns nothing from one pass).
    "ppo": ("ppo", {}),
}
"""Method name -> (registered algorithm, config overrides on top of ``Budget``'s shared ones)."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every (method, seed) run gets: the same samples, updates and evaluation."""

    iterations: int = 80
    prompts: int = 8
    group_size: int = 4
    """Samples per prompt (GRPO/GTPO groups). PPO draws prompts x group_size distinct prompts."""
    minibatch_size: int = 16
    lr: float = 5e-4
    eval_every: int = 10
    heldout_per_kind: int = 32
    eval_samples: int = 2
    max_new_tokens: int = 64
    max_turns: int = 2
    max_total_tokens: int = 320
    seeds: int = 3

    def config(self, method: str, seed: int):
        """The algorithm config of ``method`` for ``seed``."""
        from algos.config import GRPOConfig, GTPOConfig, PPOConfig

        algo, overrides = METHODS[method]
        shared = dict(seed=seed, lr=self.lr, minibatch_size=self.minibatch_size,
                      grad_accum_steps=1, **overrides)
        if algo == "ppo":
            return PPOConfig(prompts_per_iteration=self.prompts * self.group_size, group_size=1,
                             **shared)
        config_class = GTPOConfig if algo == "gtpo" else GRPOConfig
        return config_class(prompts_per_iteration=self.prompts, group_size=self.group_size,
                            **shared)

    def run_key(self) -> dict:
        """What a run's result depends on: everything but the number of seeds, so a comparison
        can be extended with more seeds and keep its finished runs."""
        key = dataclasses.asdict(self)
        del key["seeds"]
        return key

    def eval_points(self) -> list[int]:
        return sorted({0, *range(self.eval_every, self.iterations, self.eval_every),
                       self.iterations})


# Sized from probes on the shared 2-core machine (2026-11-25, 1 thread per run): the 12-epoch
# warm-up takes 7.6-10 min wall and starts at ~28% held-out pass@1. The committed run shared the
# cores with other jobs (load 4-6): 466-742 s per GTPO/GRPO run, ~1,300 s per PPO run, ~2 h in
# all; PPO's last seed, alone at load 1, took 356 s. That puts the whole comparison at ~40 min on
# 2 quiet cores with --jobs 2: an estimate from those timings, not a timed quiet run.
DEFAULT = (Budget(), WarmupConfig())
SMOKE = (
    Budget(iterations=2, prompts=2, group_size=2, minibatch_size=4, eval_every=1,
           heldout_per_kind=1, eval_samples=1, max_new_tokens=32, seeds=2),
    WarmupConfig(traces=32, epochs=1),
)

TRAIN_KEYS = ("reward/mean", "accuracy", "turns/mean", "tool_call_rate", "exec_error_rate",
              "time/rollout_s", "time/update_s")
EVAL_KEYS = ("pass@1", "mean_turns", "tool_call_rate", "code_error_rate", "samples")


# ------------------------------------------------------------------------------------ runs


def run_path(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}.json"


def write_json(path: Path, payload: dict) -> None:
    """Atomically: a run killed mid-write leaves no file, so it is redone, never half-read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def read_finished(path: Path, budget: Budget) -> dict | None:
    """A finished run's record, if it was made with this budget (another budget is an error)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record["budget"] != budget.run_key():
        raise ValueError(f"{path} was made with another budget ({record['budget']}); "
                         "use another --out or delete it")
    return record


def evaluate(agent, budget: Budget) -> dict:
    summary = agent.evaluate(heldout_ids(budget.heldout_per_kind), samples=budget.eval_samples,
                             temperature=1.0)
    return {key: summary[key] for key in EVAL_KEYS}


def start_eval(agent, out: Path, seed: int, budget: Budget) -> dict:
    """Held-out accuracy of the warm-up model with seed ``seed``'s sampling: the same for every
    method, so it is measured once per seed and shared."""
    path = out / "runs" / "start" / f"seed{seed}.json"
    record = read_finished(path, budget)
    if record is None:
        record = {"budget": budget.run_key(), "eval": evaluate(agent, budget)}
        write_json(path, record)
    return record["eval"]


def train_run(method: str, seed: int, checkpoint: str, out: str, budget: Budget,
              threads: int) -> dict:
    """One (method, seed) run from the warm-up checkpoint; its record is written to ``runs/``."""
    import torch

    import algos
    from algos.rollout import RolloutConfig

    torch.set_num_threads(threads)
    out_dir = Path(out)
    path = run_path(out_dir, method, seed)
    started = time.perf_counter()
    rollout = RolloutConfig(max_new_tokens=budget.max_new_tokens, max_turns=budget.max_turns,
                            max_total_tokens=budget.max_total_tokens, temperature=1.0)
    torch.manual_seed(seed)  # PPO's value head is initialised here
    algo = METHODS[method][0]
    with algos.make(algo, checkpoint, "TIR-Math-v0", budget.config(method, seed), rollout=rollout,
                    env_kwargs={"problems": TrainProblems(), "system_prompt": SYSTEM_PROMPT}) as agent:
        curve = [{"iteration": 0, **start_eval(agent, out_dir, seed, budget)}]
        train = []
        points = set(budget.eval_points())
        for iteration in range(1, budget.iterations + 1):
            metrics = agent.train_iteration()
            agent.log(metrics)
            train.append({"iteration": iteration, **{k: metrics[k] for k in TRAIN_KEYS}})
            if iteration in points:
                curve.append({"iteration": iteration, **evaluate(agent, budget)})
                logger.info("%s seed %d iteration %d: held-out pass@1 %.3f",
                            method, seed, iteration, curve[-1]["pass@1"])
    record = {
        "method": method, "algo": algo, "seed": seed, "budget": budget.run_key(),
        "config": budget.config(method, seed).to_dict(), "curve": curve, "train": train,
        "final": curve[-1]["pass@1"], "seconds": time.perf_counter() - started,
        "load_average_1min_end": os.getloadavg()[0],
    }
    write_json(path, record)
    return record


def _worker_init(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _collect(runs: dict, finished, total: int) -> None:
    for done, ((method, seed), record) in enumerate(finished, 1):
        runs[method][seed] = record
        logger.info("run %d/%d done: %s seed %d, held-out pass@1 %.3f in %.0f s",
                    done, total, method, seed, record["final"], record["seconds"])


def run_all(methods: list[str], seeds: list[int], checkpoint: Path, out: Path, budget: Budget,
            jobs: int, threads: int) -> dict[str, dict[int, dict]]:
    """Every (method, seed) run, ``jobs`` at a time in fresh processes (``jobs=1``: here);
    finished ones are read back instead."""
    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    todo = []
    for seed in seeds:  # seed-major: a stopped comparison has every method at its first seeds
        for method in methods:
            record = read_finished(run_path(out, method, seed), budget)
            if record is None:
                todo.append((method, seed))
            else:
                runs[method][seed] = record
    logger.info("%d runs finished before, %d to do", sum(map(len, runs.values())), len(todo))
    if jobs == 1:  # in this process: no worker start-up (a smoke run is mostly start-up)
        results = (train_run(m, s, str(checkpoint), str(out), budget, threads) for m, s in todo)
        _collect(runs, zip(todo, results), len(todo))
        return runs
    # spawn: each run gets a clean process (no forked torch thread pools or sandbox handles).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_worker_init,
        initargs=(logging.getLogger().level,),
    ) as pool:
        futures = {
            pool.submit(train_run, method, seed, str(checkpoint), str(out), budget, threads):
            (method, seed) for method, seed in todo
        }
        done = concurrent.futures.as_completed(futures)
        _collect(runs, ((futures[f], f.result()) for f in done), len(todo))
    return runs


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
    """Per method: final accuracy per seed, its mean and 95% t-interval, and the mean curve."""
    summary = {}
    for method, by_seed in runs.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        finals = [by_seed[s]["final"] for s in seeds]
        mean, low, high = t_interval(finals)
        iterations = [p["iteration"] for p in by_seed[seeds[0]]["curve"]]
        curves = np.array([[p["pass@1"] for p in by_seed[s]["curve"]] for s in seeds])
        summary[method] = {
            "seeds": seeds, "final": finals, "mean": mean, "ci95": [low, high],
            "start": float(np.mean(curves[:, 0])),
            "curve": {"iteration": iterations, "mean": curves.mean(0).tolist(),
                      "min": curves.min(0).tolist(), "max": curves.max(0).tolist()},
            "seconds": [by_seed[s]["seconds"] for s in seeds],
        }
    return summary


def paired_difference(runs: dict[str, dict[int, dict]], a: str, b: str) -> dict | None:
    """``a - b`` in final accuracy over the seeds both finished (paired: same start, prompts,
    evaluation seed)."""
    if a not in runs or b not in runs:
        return None
    seeds = sorted(set(runs[a]) & set(runs[b]))
    if not seeds:
        return None
    diffs = [runs[a][s]["final"] - runs[b][s]["final"] for s in seeds]
    mean, low, high = t_interval(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "ci95": [low, high]}


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


def machine_info(started: float, load_start: tuple[float, ...]) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                            capture_output=True, text=True).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }


def write_markdown(path: Path, results: dict, title: str) -> None:
    budget, machine, summary = results["budget"], results["machine"], results["summary"]
    warm = results["warmup"]
    lines = [
        f"# {title}", "",
        (f"Tiny Llama ({warm['parameters']:,} parameters) warmed up on {warm['traces']['traces']} "
        f"synthetic traces ({100 * warm['traces']['correct_rate']:.0f}% of them correct), then "
        f"trained by each method for {budget['iterations']} iterations x {budget['prompts']} "
        f"prompts x {budget['group_size']} samples (PPO: {budget['prompts'] * budget['group_size']}"
        f" prompts x 1) on procedural kinds {', '.join(KINDS)}."),
        (f"Held-out: {budget['heldout_per_kind'] * len(KINDS)} fixed problems never trained on, "
         f"pass@1 sampled at temperature 1 ({budget['eval_samples']} per problem)."), "",
        "| method | seeds | start | final (mean) | 95% CI (t) | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        low, high = row["ci95"]
        ci = "n/a" if low is None else f"[{100 * low:.1f}, {100 * high:.1f}]"
        per_seed = ", ".join(f"{100 * v:.1f}" for v in row["final"])
        lines.append(f"| {method} | {len(row['seeds'])} | {100 * row['start']:.1f} | "
                     f"{100 * row['mean']:.1f} | {ci} | {per_seed} |")
    lines += ["", "Accuracies in %.", "", f"**{results['verdict']}**", ""]
    for name, diff in results["paired"].items():
        if diff is not None and diff["ci95"][0] is not None:
            lines.append(f"- {name}: {100 * diff['mean']:+.1f} points, 95% CI "
                         f"[{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}] "
                         f"(paired over {len(diff['seeds'])} seeds)")
    load = machine["load_average_start"]
    lines += [
        "", "![learning curves](curves.png)", "",
        (f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
        f"commit {machine['commit']}; {machine['date']}. Load average (1/5/15 min) "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the start, "
        f"{machine['load_average_end'][0]:.1f} at the end (other jobs shared the machine when it "
        f"is above the core count). Run time per (method, seed): "
         f"{results['seconds_per_run_median']:.0f} s median."), "",
    ]
    path.write_text("\n".join(lines))


def plot(path: Path, summary: dict, title: str) -> None:
    """Held-out pass@1 against iteration: mean over seeds, min-max band; baselines on the left,
    GTPO's ablations on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("GTPO vs GRPO vs PPO", ("gtpo", "grpo", "ppo")),
              ("GTPO ablations", ("gtpo", "gtpo-no-turn-rewards", "gtpo-gamma1",
                                  "gtpo-no-shaping"))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (name, methods) in zip(axes, panels):
        for method in methods:
            if method not in summary:
                continue
            c = summary[method]["curve"]
            line, = ax.plot(c["iteration"], [100 * v for v in c["mean"]], marker="o",
                            label=f"{method} (n={len(summary[method]['seeds'])})")
            ax.fill_between(c["iteration"], [100 * v for v in c["min"]],
                            [100 * v for v in c["max"]], color=line.get_color(), alpha=0.15)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out pass@1 (%), T=1; band = min-max over seeds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a minutes-long run into a temp dir (a check, not a result)")
    parser.add_argument("--out", type=Path, help="output dir (default: benchmarks/results/"
                        "compare, or a temp dir with --smoke)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, help="seeds per method (default: the budget's)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs in parallel, one process each (default 2: one per core)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: OpenMP threads thrash on a shared machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    budget, warmup = SMOKE if args.smoke else DEFAULT
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=args.seeds)
    out = args.out or (Path(tempfile.gettempdir()) / "tir-compare-smoke" if args.smoke
                       else ROOT / "benchmarks" / "results" / "compare")
    out.mkdir(parents=True, exist_ok=True)
    title = ("Algorithm comparison (smoke run: not a result)" if args.smoke
             else "Algorithm comparison: GTPO vs GRPO vs PPO on a tiny TIR task")

    checkpoint = warmup_checkpoint(out, warmup)
    runs = run_all(args.methods, list(range(budget.seeds)), checkpoint, out, budget,
                   args.jobs, args.threads)
    summary = summarize(runs)
    paired = {f"{a} - grpo": paired_difference(runs, a, "grpo")
              for a in args.methods if a != "grpo"}
    results = {
        "title": title,
        "budget": dataclasses.asdict(budget),
        "warmup": json.loads((checkpoint.parent / "warmup.json").read_text()),
        "heldout": {"problems": heldout_ids(budget.heldout_per_kind),
                    "sampling": f"temperature 1, {budget.eval_samples} samples, pass@1"},
        "methods": {m: dict(METHODS[m][1], algo=METHODS[m][0]) for m in args.methods},
        "runs": {m: {str(s): r for s, r in sorted(by_seed.items())} for m, by_seed in runs.items()},
        "summary": summary,
        "paired": paired,
        "verdict": verdict(paired.get("gtpo - grpo")),
        "seconds_per_run_median": float(np.median(
            [r["seconds"] for by_seed in runs.values() for r in by_seed.values()])),
        "machine": machine_info(started, load_start),
    }
    write_json(out / "results.json", results)
    write_markdown(out / "compare.md", results, title)
    plot(out / "curves.png", summary, title)
    print((out / "compare.md").read_text())
    logger.info("wrote %s", out)
    return results


if __name__ == "__main__":
    main()
