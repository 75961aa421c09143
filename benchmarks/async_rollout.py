"""Rollout throughput: today's path against finished rows leaving the batch, kept KV states and
episodes advancing on their own.

The main job's rollout shape (``algos.cli.MAIN_JOB``: 4 prompts x 4 samples, 48 new tokens a turn,
2 turns, 512 tokens an episode, temperature 0.8, stop at the closing code fence) on its procedural
problem kinds and system prompt, with the real local sandbox and grader. Several ways to collect
the same problems, interleaved round by round in one process (the machine is shared, so the ratio
of runs seconds apart tells more than either number):

- ``generate``: the baseline, the path before any of the others: ``collect_lockstep`` (one call
  per turn round for all live episodes, then one vector-env step) with transformers'
  ``model.generate``, which decodes every row until the longest ends and keeps nothing between
  calls (every turn prefills its whole context, a group prefills its one prompt once per sample);
- ``lockstep``: ``collect_lockstep`` with ``hf`` keeping no KV states, whose decode loop drops each
  row from the batch the step it finishes;
- ``lockstep-prefix``: the same with ``hf``'s kept states (``algos.generation.prefix_cache``);
- ``async-hf``: ``collect`` (the episode scheduler over a thread env pool) with ``hf`` and its kept
  states, which batches whatever turns are pending in one call: what ``tir train`` runs;
- ``async-cb``: ``collect`` with ``hf-continuous`` (transformers' continuous batching, paged KV cache
  with prefix sharing), one request per turn the moment its observation is back.

Each round draws new problems; all modes of a round roll out the same ones. The model is a main-job
checkpoint when ``--model`` names one (a policy that calls the tool, so episodes take 2 turns), else
the default SmolLM2-135M-Instruct. One torch thread, as the main job runs.

Usage: ``python benchmarks/async_rollout.py [--model DIR] [--rounds 3] [--modes ...] [--out DIR]``;
writes
``async_rollout.json`` and ``async_rollout.md`` to ``benchmarks/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algos.evaluation.provenance import machine_info, write_benchmark  # noqa: E402
from algos.evaluation.report import md_table  # noqa: E402

logger = logging.getLogger("benchmarks.async_rollout")

MODES = ("generate", "lockstep", "lockstep-prefix", "async-hf", "async-cb")
BASELINE = "generate"


def generate_baseline(model, tokenizer):
    """The ``generate`` mode's backend: ``model.generate`` with transformers' own stop strings,
    logprobs from its returned logits (``log_softmax(logits / T)`` at each sampled id)."""
    import torch
    from transformers import GenerationConfig

    from algos.generation.base import Completion, Generator
    from algos.generation.hf import eos_token_ids
    from algos.generation.prefix_cache import left_pad

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    def end_of(ids: list[int], stops: tuple[str, ...]) -> tuple[int, str]:
        for n, token in enumerate(ids, 1):
            if token in eos:
                return n, "eos"
            if any(stop in tokenizer.decode(ids[max(0, n - 8) : n]) for stop in stops):
                return n, "stop"
        return len(ids), "length"

    class GenerateBaseline(Generator):
        @torch.no_grad()
        def generate(self, prompts, params):
            width = max(map(len, prompts))
            input_ids, attention_mask = left_pad(prompts, width, pad)
            config = GenerationConfig(
                max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                temperature=None if params.greedy else params.temperature, top_p=params.top_p,
                top_k=None if params.greedy else 0, eos_token_id=eos, pad_token_id=pad,
                stop_strings=list(params.stop) or None, output_logits=True,
                return_dict_in_generate=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0 if params.seed is None else params.seed)
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     generation_config=config, tokenizer=tokenizer)
            sequences = out.sequences[:, width:]
            logits = torch.stack(out.logits, dim=1).float() / (params.temperature or 1.0)
            logprobs = torch.log_softmax(logits, -1).gather(2, sequences[:, :, None])[..., 0]
            completions = []
            for ids, lps in zip(sequences.tolist(), logprobs.tolist()):
                n, reason = end_of(ids, params.stop)
                completions.append(Completion(token_ids=ids[:n], logprobs=lps[:n],
                                              finish_reason=reason,
                                              text=tokenizer.decode(ids[:n],
                                                                    skip_special_tokens=True)))
            return completions

    return GenerateBaseline()


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    import tir_envs  # noqa: F401
    from algos.cli import MAIN_JOB, MAIN_WARMUP
    from algos.generation.base import SamplingParams
    from algos.generation.hf import HFGenerator
    from algos.generation.hf_continuous import ContinuousHFGenerator
    from algos.models import DEFAULT_MODEL, load_policy
    from algos.rollout import RolloutConfig, collect, collect_lockstep, make_vec_env
    from algos.warmup import WarmupConfig
    from tir_envs.procedural import ProceduralProblems

    torch.set_num_threads(args.threads)
    model, tokenizer = load_policy(args.model or DEFAULT_MODEL)
    rollout = RolloutConfig(**{k.removeprefix("rollout."): v for k, v in MAIN_JOB.items()
                               if k.startswith("rollout.")})
    prompts, group = MAIN_JOB["prompts_per_iteration"], MAIN_JOB["group_size"]
    problems = ProceduralProblems(MAIN_WARMUP["kinds"])
    vec_env, sandbox = make_vec_env(
        "TIR-Math-v0", prompts * group, tokenizer, rollout,
        env_kwargs={"problems": problems, "system_prompt": WarmupConfig().system_prompt},
    )
    modes = args.modes
    backends = {"generate": generate_baseline(model, tokenizer),
                "lockstep": HFGenerator(model, tokenizer, prefix_cache_bytes=0),
                "lockstep-prefix": HFGenerator(model, tokenizer),
                "async-hf": HFGenerator(model, tokenizer),
                "async-cb": ContinuousHFGenerator(model, tokenizer)}
    rounds = []
    try:
        for r in range(args.rounds + 1):  # round 0 warms up every mode
            rng = np.random.default_rng([args.seed, r])
            ids = [problems.sample(rng).id for _ in range(prompts)]
            params = SamplingParams(max_new_tokens=rollout.max_new_tokens,
                                    temperature=rollout.temperature, stop=rollout.stop,
                                    seed=args.seed + r)
            record = {"round": r, "warmup": r == 0, "problems": ids,
                      "load": os.getloadavg()[0]}
            for mode in modes:
                generator = backends[mode]
                collect_fn = collect if mode.startswith("async") else collect_lockstep
                started = time.perf_counter()
                trajectories = collect_fn(vec_env, generator, tokenizer, ids, group, params,
                                          max_total_tokens=rollout.max_total_tokens)
                seconds = time.perf_counter() - started
                generator.update_weights(model)  # as after an update: the next round starts clean
                tokens = sum(t.num_generated for t in trajectories)
                record[mode] = {
                    "seconds": seconds,
                    "generated_tokens": tokens,
                    "tokens_per_s": tokens / seconds,
                    "turns_mean": statistics.mean(len(t.turns) for t in trajectories),
                    "two_turn_episodes": sum(len(t.turns) >= 2 for t in trajectories),
                    "accuracy": statistics.mean(t.correct for t in trajectories),
                    "infra_errors": sum(t.infra_error for t in trajectories),
                }
                logger.info("round %d %s: %.1fs, %d tokens, %.1f tok/s, turns %.2f", r, mode,
                            seconds, tokens, tokens / seconds, record[mode]["turns_mean"])
            rounds.append(record)
    finally:
        backends["async-cb"].close()
        vec_env.close()
        sandbox.close()
    return {"rounds": rounds, "modes": modes, "model": args.model or DEFAULT_MODEL,
            "rollout": vars(rollout),
            "prompts": prompts, "group_size": group, "threads": args.threads}


def summarize(report: dict) -> dict:
    """Medians over the measured rounds; ratios per round against the baseline, then the
    median."""
    rows = [r for r in report["rounds"] if not r["warmup"]]
    out = {}
    for mode in report["modes"]:
        out[mode] = {
            key: statistics.median(r[mode][key] for r in rows)
            for key in ("seconds", "generated_tokens", "tokens_per_s", "turns_mean")
        }
        out[mode]["vs_baseline"] = statistics.median(
            r[mode]["tokens_per_s"] / r[BASELINE]["tokens_per_s"] for r in rows
        )
    return out


def render(report: dict) -> str:
    m, s = report["machine"], report["summary"]
    lines = [
        "# Rollout throughput: `model.generate` in lockstep against our decode loop, kept KV "
        "states and asynchronous episodes",
        "",
        f"{m['date']} · {m['cpu']} · {m['cpus']} cores · torch {m['torch']} · "
        f"transformers {m['transformers']} · commit {m['commit']}",
        "",
        f"Load average (1 / 5 / 15 min) at start {' / '.join(map(str, m['load_average']))}, "
        f"at end {' / '.join(map(str, report['load_end']))}: a shared 2-core machine. Read the "
        "ratios: every round runs the modes back to back on the same problems.",
        "",
        f"Model: {report['model']}. Shape: the main job's rollout, {report['prompts']} prompts x "
        f"{report['group_size']} samples, max_new_tokens {report['rollout']['max_new_tokens']} a "
        f"turn, max_turns {report['rollout']['max_turns']}, max_total_tokens "
        f"{report['rollout']['max_total_tokens']}, temperature {report['rollout']['temperature']}, "
        f"{report['threads']} torch thread; every round runs {', '.join(report['modes'])} in this "
        "order; 1 warm-up round, then medians over "
        f"{len(report['rounds']) - 1} rounds. Whole run {report['wall_s'] / 60:.1f} min.",
        "",
    ]
    lines += md_table(
        ["mode", "rollout s", "generated tokens", "rollout tok/s", f"vs {BASELINE}", "turns"],
        [[mode, f"{s[mode]['seconds']:.1f}", f"{s[mode]['generated_tokens']:.0f}",
          f"{s[mode]['tokens_per_s']:.1f}", f"{s[mode]['vs_baseline']:.2f}",
          f"{s[mode]['turns_mean']:.2f}"] for mode in report["modes"]],
    )
    lines += [
        "",
        f"vs {BASELINE}: each round's tokens/s over that round's {BASELINE} tokens/s, median "
        "over rounds. generate: `collect_lockstep` + transformers' `model.generate`, every row "
        "decoded until the longest ends, no KV states kept between calls (the baseline); "
        "lockstep: `collect_lockstep` + `hf`, whose finished rows leave the batch, keeping no "
        "states; lockstep-prefix: the same with `hf`'s kept states; async-hf: `collect` + `hf` "
        "with kept states (what `tir train` runs); async-cb: `collect` + `hf-continuous`. "
        "Per-round numbers are in `async_rollout.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a policy directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if BASELINE not in args.modes:
        parser.error(f"--modes needs {BASELINE}: every ratio is taken against it")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    info = machine_info()
    report = run(args)
    report["machine"] = {**info, "torch_threads": args.threads}
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = time.perf_counter() - started
    report["summary"] = summarize(report)
    write_benchmark(args.out, "async_rollout", report, render(report))
    print(render(report))


if __name__ == "__main__":
    main()
