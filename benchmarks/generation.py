"""Generation throughput: our ``hf`` backend against plain ``model.generate`` on the same prompts.

Greedy decoding gives both the same tokens (checked). Sampling draws from the same distribution
with the same seed, but not the same tokens once a row ends early: ours stops computing (and
drawing for) a finished row, while ``generate`` decodes every row until the longest ends. The
timed difference is that, plus what our extras cost (per-token logprobs, per-sequence stop
strings, trimming). A third row is the usual way to get logprobs
from plain ``generate`` (``output_logits=True``), which holds ``[steps, batch, vocab]`` logits.

Runs are interleaved and repeated, and the median is reported, since the machine may be shared.

Usage: ``python benchmarks/generation.py [--models tiny default] [--prompts 8] [--new-tokens 64]``.
Writes ``benchmarks/results/generation.json`` and ``generation.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algos.evaluation.provenance import machine_info  # noqa: E402
from algos.generation import SamplingParams, make_generator  # noqa: E402
from algos.models import DEFAULT_MODEL, load_policy  # noqa: E402
from algos.tiny import tiny_model, tiny_tokenizer  # noqa: E402

logger = logging.getLogger("benchmarks.generation")
QUESTIONS = [
    "What is 17 * 23?",
    "Find the remainder when 2^100 is divided by 7.",
    "How many positive divisors does 360 have?",
    "Solve for x: 3x + 5 = 20.",
    "What is the sum of the first 50 odd numbers? Use Python.",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h?",
    "Compute gcd(462, 1071).",
    "What is the probability of rolling a sum of 7 with two dice?",
]


def _load(name: str):
    if name == "tiny":
        tok = tiny_tokenizer()
        return tiny_model(0, tok), tok
    return load_policy(DEFAULT_MODEL if name == "default" else name)


def _prompts(tok, n: int) -> list[list[int]]:
    questions = (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
            "input_ids"
        ]
        for q in questions
    ]


def _plain(model, tok, prompts, params: SamplingParams, output_logits: bool = False):
    """``model.generate`` as a user would call it on the same left-padded batch."""
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    torch.manual_seed(params.seed or 0)
    out = model.generate(
        **batch,
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        temperature=None if params.greedy else params.temperature,
        top_k=None if params.greedy else 0,
        top_p=1.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id,
        return_dict_in_generate=output_logits,
        output_logits=output_logits,
    )
    sequences = out.sequences if output_logits else out
    if output_logits:  # what a user then computes to get logprobs
        logits = torch.stack(out.logits, dim=1).float() / (params.temperature or 1.0)
        torch.log_softmax(logits, -1).gather(-1, sequences[:, batch["input_ids"].shape[1] :, None])
    generated = sequences[:, batch["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    trimmed = []
    for ids in generated:
        end = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        trimmed.append(ids[:end])
    return trimmed


def bench_model(name: str, n_prompts: int, new_tokens: int, repeats: int) -> dict:
    model, tok = _load(name)
    prompts = _prompts(tok, n_prompts)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7, seed=0)
    stop_params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7, seed=0, stop=("```\n",))
    gen = make_generator("hf", model=model, tokenizer=tok)
    runs = {
        "plain generate": lambda: _plain(model, tok, prompts, params),
        "plain generate + output_logits": lambda: _plain(model, tok, prompts, params, True),
        "ours (hf backend, logprobs)": lambda: [c.token_ids for c in gen.generate(prompts, params)],
        "ours + stop string": lambda: [c.token_ids for c in gen.generate(prompts, stop_params)],
    }
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    same = _plain(model, tok, prompts, greedy) == [c.token_ids for c in gen.generate(prompts, greedy)]
    if not same:
        logger.warning("%s: our greedy tokens differ from plain generate's", name)
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for label, run in runs.items():
            started = time.perf_counter()
            out = run()
            times[label].append(time.perf_counter() - started)
            tokens[label] = sum(len(ids) for ids in out)
    rows = []
    for label in runs:
        median = statistics.median(times[label])
        rows.append(
            {
                "run": label,
                "generated_tokens": tokens[label],
                "median_s": round(median, 3),
                "tokens_per_s": round(tokens[label] / median, 1),
            }
        )
        logger.info("%s | %s: %.1f tokens/s", name, label, tokens[label] / median)
    return {
        "model": DEFAULT_MODEL if name == "default" else name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": n_prompts,
        "max_new_tokens": new_tokens,
        "same_tokens_as_plain_generate": same,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "default"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    results = {
        "machine": machine_info(),
        "models": [bench_model(m, args.prompts, args.new_tokens, args.repeats) for m in args.models],
    }
    # Other processes on the machine skew every number: record how busy it was.
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Generation throughput (hf backend vs plain `model.generate`)",
        "",
        f"{m['date']}, {m['cpu']} ({m['cpus']} CPUs), {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, commit {m['commit']}; "
        "temperature 0.7, same seed, medians of interleaved repeats; 1-min load average "
        f"{results['load_average_1min']['before']:.1f} before, "
        f"{results['load_average_1min']['after']:.1f} after.",
        "",
        "| model | run | generated tokens | median s | tokens/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for m in results["models"]:
        for row in m["rows"]:
            lines.append(
                f"| {m['model']} ({m['prompts']}x{m['max_new_tokens']}) | {row['run']} | "
                f"{row['generated_tokens']} | {row['median_s']} | {row['tokens_per_s']} |"
            )
    lines += ["", "Same greedy tokens as plain generate: " + ", ".join(
        f"{m['model']}: {m['same_tokens_as_plain_generate']}" for m in results["models"]
    )]
    (args.out / "generation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
