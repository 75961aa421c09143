"""Scaling on this machine: rollout throughput against the number of live episodes, and a
data-parallel training step on 1 against 2 processes.

1. **Rollouts.** What ``tir train`` runs (``collect``: the episode scheduler with the ``hf``
   backend and its kept KV states) on the main job's rollout shape (its procedural kinds and
   system prompt, 48 new tokens a turn, 2 turns, temperature 0.8, the real local sandbox and
   grader), with 1, 2, 4, 8, 16 and 32 episodes live at once (groups of up to 4 samples a
   problem). The episode counts of a round run back to back, each round on new problems; 1
   warm-up round, then medians. On a CPU a decode step costs more the more rows it computes, so
   the curve flattens where the cores are full, unlike a GPU's.
2. **DDP step.** One training step as ``tir train --nproc N`` takes it (the model wrapped by
   ``algos.distributed.Ranks``: DDP over gloo when launched in 2 processes) on a fixed batch of
   8 sequences of 256 tokens: forward, backward (gradients all-reduced), AdamW step, with the
   main job's model and its top 8 blocks trained. 1 process computes all 8 sequences, each of 2
   processes 4 (launched by ``torch.distributed.run``), one torch thread per process. Median
   step time after a warm-up step.

Usage: ``python benchmarks/scaling.py [--model DIR] [--rounds 2] [--steps 5] [--out DIR]``;
writes ``scaling.json`` and ``scaling.md`` to ``benchmarks/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algos.evaluation.provenance import machine_info, write_benchmark  # noqa: E402
from algos.evaluation.report import md_table  # noqa: E402

logger = logging.getLogger("benchmarks.scaling")

EPISODES = (1, 2, 4, 8, 16, 32)
DDP_BATCH, DDP_TOKENS, DDP_LAYERS = 8, 256, 8


def rollouts(model_name: str, rounds: int, seed: int) -> list[dict]:
    import numpy as np

    import tir_envs  # noqa: F401
    from algos.cli import MAIN_JOB, MAIN_WARMUP
    from algos.generation.base import SamplingParams
    from algos.generation.hf import HFGenerator
    from algos.models import load_policy
    from algos.rollout import RolloutConfig, collect, make_vec_env
    from algos.warmup import WarmupConfig
    from tir_envs.procedural import ProceduralProblems

    model, tokenizer = load_policy(model_name)
    rollout = RolloutConfig(**{k.removeprefix("rollout."): v for k, v in MAIN_JOB.items()
                               if k.startswith("rollout.")})
    problems = ProceduralProblems(MAIN_WARMUP["kinds"])
    vec_env, sandbox = make_vec_env(
        "TIR-Math-v0", max(EPISODES), tokenizer, rollout,
        env_kwargs={"problems": problems, "system_prompt": WarmupConfig().system_prompt},
    )
    generator = HFGenerator(model, tokenizer)
    records = []
    try:
        for r in range(rounds + 1):  # round 0 warms up
            rng = np.random.default_rng([seed, r])
            params = SamplingParams(max_new_tokens=rollout.max_new_tokens,
                                    temperature=rollout.temperature, stop=rollout.stop,
                                    seed=seed + r)
            for n in EPISODES:
                group = min(n, MAIN_JOB["group_size"])
                ids = [problems.sample(rng).id for _ in range(n // group)]
                started = time.perf_counter()
                trajectories = collect(vec_env, generator, tokenizer, ids, group, params,
                                       max_total_tokens=rollout.max_total_tokens)
                seconds = time.perf_counter() - started
                generator.update_weights(model)  # each count starts from nothing kept
                tokens = sum(t.num_generated for t in trajectories)
                records.append({"round": r, "warmup": r == 0, "episodes": n, "seconds": seconds,
                                "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
                                "infra_errors": sum(t.infra_error for t in trajectories),
                                "load": os.getloadavg()[0]})
                logger.info("round %d, %d episodes: %.1f s, %d tokens, %.1f tok/s", r, n,
                            seconds, tokens, tokens / seconds)
    finally:
        vec_env.close()
        sandbox.close()
    return records


def ddp_worker(model_name: str, steps: int, out: Path) -> None:
    """One rank of the DDP measurement (run under ``torch.distributed.run``)."""
    import torch

    from algos.distributed import Ranks, make_accelerator
    from algos.models import load_policy, train_top_layers

    torch.set_num_threads(1)
    ranks = Ranks(make_accelerator())
    model, _ = load_policy(model_name)
    model.train()
    train_top_layers(model, DDP_LAYERS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    module, optimizer = ranks.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (DDP_BATCH, DDP_TOKENS),
                          generator=generator)
    share = batch.chunk(ranks.world)[ranks.rank]
    times = []
    for _ in range(steps + 1):  # the first step warms up
        started = time.perf_counter()
        loss = module(input_ids=share, labels=share).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    if ranks.is_main:
        out.write_text(json.dumps({"processes": ranks.world, "rows_per_process": len(share),
                                   "step_s": times[1:]}))


def ddp(model_name: str, steps: int) -> list[dict]:
    results = []
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ddp.json"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", __file__, "--ddp-worker", "--model", model_name,
                 "--steps", str(steps), "--worker-out", str(out)],
                env=env, check=True)
            record = json.loads(out.read_text())
        record["median_step_s"] = statistics.median(record["step_s"])
        logger.info("DDP %d process(es): median step %.2f s", nproc, record["median_step_s"])
        results.append(record)
    return results


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for n in EPISODES:
        measured = [r for r in records if r["episodes"] == n and not r["warmup"]]
        rows.append({"episodes": n,
                     "seconds": statistics.median(r["seconds"] for r in measured),
                     "generated_tokens": statistics.median(r["generated_tokens"] for r in measured),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured)})
    single = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_one_episode"] = row["tokens_per_s"] / single
    return rows


def render(report: dict) -> str:
    m = report["machine"]
    one, two = report["ddp"]
    lines = [
        "# Scaling on this machine: live episodes and DDP processes", "",
        f"{m['date']} · {m['cpu']} · {m['cpus']} cores · torch {m['torch']} · "
        f"transformers {m['transformers']} · commit {m['commit']}", "",
        f"Load average (1 / 5 / 15 min) at start {' / '.join(map(str, m['load_average']))}, at "
        f"end {' / '.join(map(str, report['load_end']))}. Model: {report['model']}. Whole run "
        f"{report['wall_s'] / 60:.1f} min.", "",
        f"## Rollout throughput against live episodes (`collect` + `hf`, medians of "
        f"{report['rounds']} rounds)", "",
    ]
    lines += md_table(
        ["live episodes", "rollout s", "generated tokens", "rollout tok/s", "vs 1 episode"],
        [[str(row["episodes"]), f"{row['seconds']:.1f}", f"{row['generated_tokens']:.0f}",
          f"{row['tokens_per_s']:.1f}", f"{row['vs_one_episode']:.2f}"]
         for row in report["rollouts"]])
    lines += [
        "", f"## One DDP training step ({DDP_BATCH} x {DDP_TOKENS} tokens, top {DDP_LAYERS} "
        "blocks trained, 1 torch thread per process)", "",
    ]
    lines += md_table(
        ["processes", "sequences per process", "median step s", "speed-up"],
        [[str(r["processes"]), str(r["rows_per_process"]), f"{r['median_step_s']:.2f}",
          f"{one['median_step_s'] / r['median_step_s']:.2f}"] for r in (one, two)])
    lines += ["", "Per-round and per-step numbers are in `scaling.json`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a policy directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="measured DDP steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from algos.models import DEFAULT_MODEL

    model_name = args.model or DEFAULT_MODEL
    if args.ddp_worker:
        ddp_worker(model_name, args.steps, args.worker_out)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    started, info = time.perf_counter(), machine_info()
    records = rollouts(model_name, args.rounds, args.seed)
    report = {"model": model_name, "rounds": args.rounds, "episodes": list(EPISODES),
              "rollout_records": records, "rollouts": summarize(records),
              "ddp": ddp(model_name, args.steps), "machine": {**info, "torch_threads": 1}}
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = time.perf_counter() - started
    write_benchmark(args.out, "scaling", report, render(report))
    print(render(report))


if __name__ == "__main__":
    main()
