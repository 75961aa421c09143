"""Env throughput: what the env itself costs, what grading costs, and oracle episodes/s end to end.

1. Step overhead without the sandbox and the grader: turn parsing alone, then whole episodes
   (reset + tool turn + final turn) through ``gymnasium.make`` with an instant in-process sandbox
   and the grader stubbed out, so what remains is the env's own work.
2. Grading latency p50/p99 over every MATH-500 gold answer: graded against itself (string layer),
   through math-verify only, and against a wrong answer.
3. The local sandbox's session open/close, paid once per episode, to explain the next numbers.
4. Episodes/s of the scripted oracle (one tool turn running the problem's solver in the real local
   sandbox, then a graded final turn) through 1, 2 and 4 envs, sync and async vector envs.

Usage: ``python benchmarks/env.py [--data-dir ../shared/data/benchmarks] [--episodes 200]``.
Writes ``benchmarks/results/env.json`` and ``env.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import tir_envs
from algos.evaluation.provenance import machine_info
from tir_envs import data, grading
from tir_envs.procedural import ProceduralProblems, oracle_turn
from tir_envs.protocol import parse_turn
from tir_envs.sandbox import (
    ExecResult,
    ExecStatus,
    Isolation,
    Limits,
    Sandbox,
    Session,
    make_sandbox,
)

logger = logging.getLogger("benchmarks.env")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "benchmarks"


class _InstantSession(Session):
    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        return ExecResult(ExecStatus.OK, stdout="42\n")

    def close(self) -> None:
        pass


class InstantSandbox(Sandbox):
    """A sandbox that runs nothing: isolates the env's own per-step cost."""

    limits = Limits()
    isolation = Isolation()

    def session(self) -> Session:
        return _InstantSession()

    def close(self) -> None:
        pass


@contextlib.contextmanager
def stubbed_grader():
    real = grading.judge
    grading.judge = lambda predicted, gold, timeout_s=5.0: grading.Verdict(
        predicted == gold, "stub"
    )
    try:
        yield
    finally:
        grading.judge = real


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.array(samples_s) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
        "n": len(ms),
    }


def bench_parsing(repeats: int) -> dict:
    problem = ProceduralProblems().get("proc/linear_system/0")
    reasoning = "We set up the system and let the computer solve it exactly. " * 8
    tool_turn = f"{reasoning}\n```python\n{problem.meta['solver']}\n```"
    final_turn = f"{reasoning} So the value is $\\boxed{{\\frac{{51}}{{2}}}}$."
    results = {}
    for name, text in (("tool_turn", tool_turn), ("final_turn", final_turn)):
        start = time.perf_counter()
        for _ in range(repeats):
            parse_turn(text)
        results[f"parse_{name}_us"] = (time.perf_counter() - start) / repeats * 1e6
        results[f"parse_{name}_chars"] = len(text)
    return results


def bench_step_overhead(episodes: int) -> dict:
    env = gym.make("TIR-Math-v0", sandbox=InstantSandbox())
    env.reset(seed=0)
    resets, tool_steps, final_steps = [], [], []
    with stubbed_grader():
        for _ in range(episodes):
            start = time.perf_counter()
            obs, info = env.reset()
            resets.append(time.perf_counter() - start)
            action = oracle_turn(info["problem_id"], obs)
            start = time.perf_counter()
            obs, *_ = env.step(action)
            tool_steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            env.step("The result is \\boxed{42}.")
            final_steps.append(time.perf_counter() - start)
    env.close()
    return {
        "reset (procedural problem generation + prompt)": percentiles(resets),
        "tool step (instant sandbox)": percentiles(tool_steps),
        "final step (grader stubbed)": percentiles(final_steps),
    }


def bench_grading(data_dir: Path) -> dict:
    """Three paths: a right answer as the env usually sees it (string layer), the same with every
    answer forced through math-verify, and a wrong answer (``(gold)+1``), which LaTeX golds send to
    math-verify too."""
    problems = data.load_benchmark("math500", data_dir=data_dir)
    cases = {
        "gold vs gold, default grader": (grading.Grader(), lambda g: g, True),
        "gold vs gold, math-verify only": (
            grading.Grader(use_string_layer=False),
            lambda g: g,
            True,
        ),
        "(gold)+1 vs gold, default grader": (grading.Grader(), lambda g: f"({g})+1", False),
    }
    results = {}
    for name, (grader, predict, expected) in cases.items():
        grader.warm_up()
        latencies, unexpected = [], []
        for problem in problems:
            start = time.perf_counter()
            verdict = grader.judge(predict(problem.answer), problem.answer)
            latencies.append(time.perf_counter() - start)
            if verdict.correct != expected:
                unexpected.append(problem.id)
        grader.close()
        results[name] = {
            **percentiles(latencies),
            "expected_verdicts": len(problems) - len(unexpected),
            "unexpected": unexpected,
        }
    return results


def bench_session_lifecycle(repeats: int) -> dict:
    """Where an oracle episode's time goes: the local sandbox's per-episode kernel."""
    sandbox = make_sandbox("local")
    opens, runs, closes = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        session = sandbox.session()
        session.run("pass")
        opened = time.perf_counter()
        session.run("print(sum(range(10)))")
        ran = time.perf_counter()
        session.close()
        opens.append(opened - start)
        runs.append(ran - opened)
        closes.append(time.perf_counter() - ran)
    sandbox.close()
    return {
        "session open + first cell": percentiles(opens),
        "warm cell print(sum(range(10)))": percentiles(runs),
        "session close": percentiles(closes),
    }


def _oracle_episodes(vec_env: gym.vector.VectorEnv, episodes: int) -> tuple[int, int, float, int]:
    obs, infos = vec_env.reset(seed=0)
    ids = list(infos["problem_id"])
    done = np.zeros(vec_env.num_envs, dtype=bool)
    finished = solved = steps = 0
    start = time.perf_counter()
    while finished < episodes:
        obs, rewards, terminated, truncated, infos = vec_env.step(
            [oracle_turn(pid, o) for o, pid in zip(obs, ids)]
        )
        steps += vec_env.num_envs
        ended = (terminated | truncated) & ~done
        finished += int(ended.sum())
        solved += int(((rewards > 0) & ended).sum())
        ids = list(infos["problem_id"])
        done = terminated | truncated
    return finished, solved, time.perf_counter() - start, steps


def bench_oracle(episodes: int) -> list[dict]:
    rows = []
    for num_envs in (1, 2, 4):
        for mode in ("sync", "async"):
            vec_env = gym.make_vec("TIR-Math-v0", num_envs=num_envs, vectorization_mode=mode)
            _oracle_episodes(vec_env, 2 * num_envs)  # start sandboxes, warm imports
            finished, solved, seconds, steps = _oracle_episodes(vec_env, episodes)
            vec_env.close()
            rows.append(
                {
                    "num_envs": num_envs,
                    "mode": mode,
                    "episodes": finished,
                    "solved": solved,
                    "seconds": seconds,
                    "episodes_per_s": finished / seconds,
                    "steps_per_s": steps / seconds,
                }
            )
            logger.info("oracle %s x%d: %.1f episodes/s", mode, num_envs, finished / seconds)
    return rows


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Env benchmark",
        "",
        f"{m['date']} · {m['cpu']} · {m['cpus']} cores · Python {m['python']} · "
        f"gymnasium {m['gymnasium']} · commit {m['commit']}",
        "",
        f"Load average (1 min) at start {m['load_average'][0]:.2f}, at end "
        f"{results['load_average_1m_at_end']:.2f} (a shared machine: other work slows runs).",
        "",
        "## Env overhead without sandbox and grader",
        "",
        f"Parsing a {results['parsing']['parse_tool_turn_chars']}-char tool turn: "
        f"{results['parsing']['parse_tool_turn_us']:.1f} µs; a "
        f"{results['parsing']['parse_final_turn_chars']}-char final turn: "
        f"{results['parsing']['parse_final_turn_us']:.1f} µs.",
        "",
        "| call (through gymnasium.make wrappers) | p50 ms | p99 ms | mean ms |",
        "| --- | --- | --- | --- |",
    ]
    for name, stats in results["step_overhead"].items():
        lines.append(
            f"| {name} | {stats['p50_ms']:.3f} | {stats['p99_ms']:.3f} | {stats['mean_ms']:.3f} |"
        )
    lines += ["", "## Grading latency over all MATH-500 gold answers", ""]
    if "grading" in results:
        lines += [
            "| case | p50 ms | p99 ms | max ms | expected verdicts |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, g in results["grading"].items():
            lines.append(
                f"| {name} | {g['p50_ms']:.3f} | {g['p99_ms']:.2f} | {g['max_ms']:.1f} | "
                f"{g['expected_verdicts']}/{g['n']} |"
            )
        for name, g in results["grading"].items():
            if g["unexpected"]:
                lines.append(f"\n{name}, unexpected verdicts: {', '.join(g['unexpected'])}")
    else:
        lines.append("Skipped: MATH-500 file not found.")
    lines += [
        "",
        "## Local sandbox session lifecycle (paid once per episode that calls the tool)",
        "",
        "| call | p50 ms | p99 ms | mean ms |",
        "| --- | --- | --- | --- |",
    ]
    for name, stats in results["session_lifecycle"].items():
        lines.append(
            f"| {name} | {stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} | {stats['mean_ms']:.2f} |"
        )
    lines += [
        "",
        "## Scripted oracle through vector envs (real local sandbox, real grader)",
        "",
        "One tool turn running the problem's solver, then a graded final turn.",
        "",
        "| envs | mode | episodes | solved | episodes/s | steps/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["oracle"]:
        lines.append(
            f"| {row['num_envs']} | {row['mode']} | {row['episodes']} | {row['solved']} | "
            f"{row['episodes_per_s']:.1f} | {row['steps_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("TIR_DATA_DIR", DEFAULT_DATA_DIR))
    )
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results = {"machine": machine_info(("gymnasium",)), "env_ids": list(tir_envs.ENV_IDS)}
    results["parsing"] = bench_parsing(repeats=20_000)
    results["step_overhead"] = bench_step_overhead(episodes=2_000)
    if (args.data_dir / "math500.jsonl").exists():
        results["grading"] = bench_grading(args.data_dir)
    else:
        logger.warning("no MATH-500 file in %s: grading latency skipped", args.data_dir)
    results["session_lifecycle"] = bench_session_lifecycle(repeats=50)
    results["oracle"] = bench_oracle(args.episodes)

    results["load_average_1m_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "env.md").write_text(to_markdown(results))
    logger.info("%s", to_markdown(results))


if __name__ == "__main__":
    main()
