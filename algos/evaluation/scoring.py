"""Score a policy on TIR env problems: per-sample records and their summary (pass@1, pass@k)."""

from __future__ import annotations

from collections import defaultdict
from math import comb

import numpy as np

from algos.generation.base import Generator, SamplingParams
from algos.rollout import collect


def problem_source(vec_env):
    """The problem source of a vector env's TIR envs: ``get(id)`` and ``sample(np_random)``."""
    return vec_env.get_attr("source")[0]


def heldout_problems(source, n: int) -> list[str]:
    """The first ``n`` problems of a source by index. Training draws procedural problems by
    random seed in [0, 2^31), so these fixed low indices are, in practice, never trained on."""
    if hasattr(source, "__len__"):
        n = min(n, len(source))
    return [source.get(i).id for i in range(n)]


def evaluate_problems(
    vec_env, generator: Generator, tokenizer, problem_ids: list[str], sampling: SamplingParams,
    *, samples: int = 1, max_total_tokens: int = 2048,
) -> list[dict]:
    """Roll out every problem ``samples`` times, ``vec_env.num_envs`` episodes at a time.

    Sample ``s`` uses seed ``sampling.seed + s`` (when set), so results do not depend on how
    problems fall into chunks of the vector env.
    """
    width = vec_env.num_envs
    records = []
    for s in range(samples):
        params = sampling if sampling.seed is None else _with_seed(sampling, sampling.seed + s)
        for start in range(0, len(problem_ids), width):
            chunk = problem_ids[start : start + width]
            trajectories = collect(
                vec_env, generator, tokenizer, chunk, 1, params, max_total_tokens=max_total_tokens
            )
            for trajectory in trajectories:
                records.append(sample_record(trajectory, sample=s))
    return records


def sample_record(trajectory, sample: int = 0) -> dict:
    """What one evaluation episode tells: correctness, turns, tool use, code errors."""
    tool_turns = [t for t in trajectory.turns if t.info.get("tool_called")]
    return {
        "problem_id": trajectory.problem_id,
        "sample": sample,
        "correct": trajectory.correct,
        "reward": float(sum(trajectory.rewards)),
        "turns": len(trajectory.turns),
        "tool_calls": len(tool_turns),
        "code_errors": sum(t.info.get("exec", {}).get("status") != "ok" for t in tool_turns),
        "infra_error": trajectory.infra_error,
        "final_answer": trajectory.turns[-1].info.get("final_answer") if trajectory.turns else None,
        "done_reason": trajectory.done_reason,
        "generated_tokens": trajectory.num_generated,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(records: list[dict], k: int | None = None) -> dict[str, float]:
    """pass@1 (mean over samples), unbiased pass@k, mean turns, tool-call and code-error rates.

    Infra-error samples are the sandbox's fault, not the model's: they are left out and counted.
    """
    scored = [r for r in records if not r["infra_error"]]
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for r in scored:
        by_problem[r["problem_id"]].append(bool(r["correct"]))
    n_min = min((len(v) for v in by_problem.values()), default=0)
    k = k or n_min
    tool_calls = sum(r["tool_calls"] for r in scored)
    summary = {
        "problems": len(by_problem),
        "samples": len(scored),
        "infra_errors": len(records) - len(scored),
        "pass@1": float(np.mean([np.mean(v) for v in by_problem.values()])) if by_problem else 0.0,
        "mean_turns": float(np.mean([r["turns"] for r in scored])) if scored else 0.0,
        "tool_call_rate": float(np.mean([r["tool_calls"] > 0 for r in scored])) if scored else 0.0,
        "code_error_rate": sum(r["code_errors"] for r in scored) / tool_calls if tool_calls else 0.0,
    }
    if k and k > 1:
        summary[f"pass@{k}"] = float(np.mean([
            pass_at_k(len(v), sum(v), k) for v in by_problem.values()
        ]))
    return summary


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


def _correct_by_problem(records: list[dict]) -> dict[str, list[bool]]:
    by_problem: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        if not r["infra_error"]:
            by_problem[r["problem_id"]].append(bool(r["correct"]))
    return by_problem


def bootstrap_pass1(
    records: list[dict], baseline: list[dict] | None = None, *, resamples: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of pass@1, resampling problems (with all their samples):
    samples of one problem are correlated, so problems, not samples, are the independent units.

    With ``baseline`` (records of another model on the same problems), the interval is of the
    paired difference ``pass@1(records) - pass@1(baseline)``.
    """
    by_problem = _correct_by_problem(records)
    problems = sorted(by_problem)
    scores = np.array([np.mean(by_problem[p]) for p in problems])
    if baseline is not None:
        base = _correct_by_problem(baseline)
        missing = [p for p in problems if p not in base]
        if missing or len(base) != len(problems):
            raise ValueError("a paired interval needs both evaluations on the same problems")
        scores = scores - np.array([np.mean(base[p]) for p in problems])
    if not len(scores):
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(len(scores), size=(resamples, len(scores)))].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
