"""Throughput side by side: our GRPO against TRL's ``GRPOTrainer``, and both against plain generate.

One script, one process, one venv (TRL's pins do not clash with ours: ``pip install trl==1.16.0``).
For each model (the tiny Llama of ``algos/tiny.py`` and the default SmolLM2-135M-Instruct) both
trainers start from the same weights and run GRPO at one shape, single-turn (where TRL works):

- the same prompts in the same order: step ``i`` of both trains on the 4 problems our agent draws
  for iteration ``i`` (TRL gets them as its dataset, unshuffled), each sampled 4 times; the
  prompt token ids are checked equal;
- the same sampling: temperature 1, top-p 1, top-k off, 128 new tokens, eos only (our rollout's
  code-fence stop is switched off, as TRL has none);
- the same update: one optimizer step per iteration over all 16 completions in one micro-batch,
  token-mean loss (TRL's ``dapo``), no KL term (both libraries' default), fp32, no activation
  checkpointing (TRL's default on, which trades speed for memory), 1 torch thread.

Our agent skips the forward pass of rows whose advantages are all 0; an untrained model earns the
same reward on every sample, so that would be every row. ``skip_flat_rows=False`` makes it update
every row, as TRL does.

Phases. Generation: our ``time/rollout_s + time/advantage_s`` (sampling, env steps with the sandbox
and grader, advantages) against TRL's ``_generate_and_score_completions`` (sampling, reward
function with the same grader, advantages). Update: our ``time/update_s`` against the rest of
TRL's optimizer step (timed from the trainer's callbacks). Tokens: generated completion tokens.
Plain ``model.generate`` on the same 16 prompt rows is the generation baseline.

The trainers run interleaved (ours, TRL, ours, TRL: ``--rounds``) and each block drops its first
step (first-call costs); numbers are medians over the rest. Writes
``benchmarks/results/vs_trl.json`` and ``vs_trl.md``.

    python benchmarks/vs_trl.py                     # both models (~15 min on 2 quiet cores)
    python benchmarks/vs_trl.py --models tiny --steps 3 --rounds 1 --out /tmp/vs_trl   # a check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from algos.evaluation.provenance import machine_info
from benchmarks.train import (
    LR,
    plain_generate,
)

logger = logging.getLogger("benchmarks.vs_trl")

PROMPTS, GROUP, MAX_NEW_TOKENS = 4, 4, 128


def model_dir(name: str, scratch: Path) -> str:
    """A directory both trainers load: the tiny model saved once, or the default model's cache."""
    if name == "default":
        from algos.models import DEFAULT_MODEL, resolve_model_dir

        return str(resolve_model_dir(DEFAULT_MODEL))
    from algos.tiny import tiny_model, tiny_tokenizer

    path = scratch / "tiny"
    if not path.exists():
        torch.manual_seed(0)
        tiny_model().save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return str(path)


def our_agent(path: str, lr: float):
    import algos
    from algos.config import GRPOConfig
    from algos.rollout import RolloutConfig

    config = GRPOConfig(
        prompts_per_iteration=PROMPTS,
        group_size=GROUP,
        minibatch_size=PROMPTS * GROUP,
        grad_accum_steps=1,
        lr=lr,
        skip_flat_rows=False,
        seed=0,
    )
    rollout = RolloutConfig(max_new_tokens=MAX_NEW_TOKENS, max_turns=1, temperature=1.0, stop=())
    return algos.make("grpo", path, "TIR-Math-v0", config, rollout=rollout)


def step_prompts(agent, steps: int) -> list[list[dict]]:
    """Per step, the problems our agent trains on, as TRL dataset rows."""
    from tir_envs.protocol import build_messages

    source = agent.problem_source()
    rows = []
    for iteration in range(steps):
        problems = [source.get(pid) for pid in agent.sample_problems(iteration)]
        rows.append(
            [
                {"prompt": build_messages(p.question), "answer": p.answer, "question": p.question}
                for p in problems
            ]
        )
    return rows


def run_ours(path: str, lr: float, steps: int) -> list[dict]:
    records = []
    with our_agent(path, lr) as agent:
        for _ in range(steps):
            m = agent.train_iteration()
            records.append(
                {
                    "generation_s": m["time/rollout_s"] + m["time/advantage_s"],
                    "update_s": m["time/update_s"],
                    "generated_tokens": m["tokens/generated"],
                    "update_tokens": m["tokens/updated"],
                }
            )
    return records


def correctness(completions, answer, **_) -> list[float]:
    """TRL reward function: the last ``\\boxed{}`` graded by our grader (the env's accuracy)."""
    from tir_envs.grading import grade, last_boxed

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(grade(last_boxed(text), gold)) for text, gold in zip(texts, answer)]


def run_trl(path: str, lr: float, rows: list[list[dict]], scratch: Path) -> list[dict]:
    """TRL's GRPOTrainer for ``len(rows)`` steps, timed per phase."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from algos.models import load_policy

    args = GRPOConfig(
        output_dir=str(scratch / "trl"),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        logging_steps=1,
        max_steps=len(rows),
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP,
        gradient_accumulation_steps=1,
        shuffle_dataset=False,
        seed=0,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        num_iterations=1,
        dataloader_num_workers=0,
    )
    records: list[dict] = []
    model, tokenizer = load_policy(path)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=correctness,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([r for step in rows for r in step]),
    )
    generate_and_score = trainer._generate_and_score_completions
    prompt_ids: list[list[int]] = []

    def timed_generate(inputs):
        started = time.perf_counter()
        out = generate_and_score(inputs)
        records[-1]["generation_s"] = time.perf_counter() - started
        records[-1]["generated_tokens"] = int(out["completion_mask"].sum())
        prompt_ids.extend(
            ids[mask.bool()].tolist() for ids, mask in zip(out["prompt_ids"], out["prompt_mask"])
        )
        return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            records.append({"started": time.perf_counter()})

        def on_step_end(self, *_, **__):
            record = records[-1]
            record["update_s"] = (
                time.perf_counter() - record.pop("started") - record["generation_s"]
            )
            record["update_tokens"] = record["generated_tokens"]

    trainer._generate_and_score_completions = timed_generate
    trainer.add_callback(StepTimer())
    trainer.train()
    records[0]["prompt_ids"] = prompt_ids[: PROMPTS * GROUP]
    return records


def plain_baseline(path: str, prompt_ids: list[list[int]], repeats: int) -> list[dict]:
    from algos.models import load_policy

    model, tokenizer = load_policy(path)
    out = []
    for seed in range(repeats):
        seconds, ids = plain_generate(model, tokenizer, prompt_ids, MAX_NEW_TOKENS, seed)
        out.append({"generation_s": seconds, "generated_tokens": sum(map(len, ids))})
    return out


def rates(records: list[dict]) -> dict[str, float]:
    """Medians of per-step throughput (tokens/s) and seconds."""

    def med(f):
        return statistics.median(f(r) for r in records)

    summary = {
        "steps": len(records),
        "generation_s": med(lambda r: r["generation_s"]),
        "generation_tok_s": med(lambda r: r["generated_tokens"] / r["generation_s"]),
        "generated_tokens": med(lambda r: r["generated_tokens"]),
    }
    if "update_s" in records[0]:
        summary |= {
            "update_s": med(lambda r: r["update_s"]),
            "update_tok_s": med(lambda r: r["update_tokens"] / r["update_s"]),
            "step_s": med(lambda r: r["generation_s"] + r["update_s"]),
            "step_tok_s": med(
                lambda r: r["generated_tokens"] / (r["generation_s"] + r["update_s"])
            ),
        }
    return summary


def bench_model(name: str, steps: int, rounds: int, scratch: Path) -> dict[str, Any]:
    path = model_dir(name, scratch)
    with our_agent(path, LR[name]) as agent:
        rows = step_prompts(agent, steps)
        from algos.rollout import prompt_token_ids
        from tir_envs.protocol import render_prompt

        ours_prompt_ids = [
            prompt_token_ids(agent.tokenizer, render_prompt(r["question"], agent.tokenizer))
            for r in rows[0]
            for _ in range(GROUP)
        ]
    raw: dict[str, list[dict]] = {"ours": [], "trl": [], "plain": []}
    same_prompts = None
    for round_ in range(rounds):
        logger.info("%s round %d/%d: ours", name, round_ + 1, rounds)
        raw["ours"] += run_ours(path, LR[name], steps)[1:]
        logger.info("%s round %d/%d: TRL", name, round_ + 1, rounds)
        trl = run_trl(path, LR[name], rows, scratch)
        trl_prompts = trl[0].pop("prompt_ids")
        same_prompts = sorted(trl_prompts) == sorted(ours_prompt_ids)
        raw["trl"] += trl[1:]
        raw["plain"] += plain_baseline(path, ours_prompt_ids, repeats=max(1, steps - 1))
    summary = {k: rates(v) for k, v in raw.items()}
    ours, trl, plain = summary["ours"], summary["trl"], summary["plain"]
    ratios = {
        "generation_ours_over_trl": ours["generation_tok_s"] / trl["generation_tok_s"],
        "update_ours_over_trl": ours["update_tok_s"] / trl["update_tok_s"],
        "step_ours_over_trl": ours["step_tok_s"] / trl["step_tok_s"],
        "generation_ours_over_plain": ours["generation_tok_s"] / plain["generation_tok_s"],
        "generation_trl_over_plain": trl["generation_tok_s"] / plain["generation_tok_s"],
    }
    return {
        "model": name,
        "path": path,
        "same_prompt_ids": same_prompts,
        "summary": summary,
        "ratios": ratios,
        "raw": raw,
    }


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = [
        "# Throughput: our GRPO vs TRL `GRPOTrainer` (and plain `model.generate`)",
        "",
        (
            f"{m['date']}, {m['cpu']} ({m['cpus']} cores), "
            f"{report['threads']} torch thread; torch {m['torch']}, transformers "
            f"{m['transformers']}, trl {m['trl']}; commit "
            f"{m['commit']}; load average {report['load_before']:.1f} before, "
            f"{report['load_after']:.1f} after."
        ),
        "",
        (
            f"Shape: single-turn TIR-Math-v0, {PROMPTS} prompts x {GROUP} samples, "
            f"{MAX_NEW_TOKENS} new tokens, temperature 1, one optimizer step over all "
            f"{PROMPTS * GROUP} completions in one micro-batch, "
            "token-mean loss, no KL, fp32, no activation checkpointing. Same weights and the same "
            f"prompts per step in both. {report['rounds']} interleaved rounds of {report['steps']} "
            "steps each, first step of each block dropped; medians per step."
        ),
        "",
        (
            "| model | run | generation tok/s | update tok/s | step tok/s | generation s "
            "| update s | generated tokens | same prompt ids |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in report["models"]:
        for run in ("ours", "trl", "plain"):
            s = m["summary"][run]
            label = {
                "ours": "tir-gym GRPO",
                "trl": "TRL GRPOTrainer",
                "plain": "plain model.generate",
            }[run]
            cells = [
                f"{s['generation_tok_s']:.0f}",
                f"{s['update_tok_s']:.0f}" if "update_s" in s else "",
                f"{s['step_tok_s']:.0f}" if "update_s" in s else "",
                f"{s['generation_s']:.2f}",
                f"{s['update_s']:.2f}" if "update_s" in s else "",
                f"{s['generated_tokens']:.0f}",
            ]
            lines.append(
                f"| {m['model']} | {label} | " + " | ".join(cells) + f" | {m['same_prompt_ids']} |"
            )
    lines += [
        "",
        (
            "| model | generation ours/TRL | update ours/TRL | whole step ours/TRL | "
            "generation ours/plain | generation TRL/plain |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in report["models"]:
        r = m["ratios"]
        lines.append(
            f"| {m['model']} | {r['generation_ours_over_trl']:.2f}x | "
            f"{r['update_ours_over_trl']:.2f}x | {r['step_ours_over_trl']:.2f}x | "
            f"{r['generation_ours_over_plain']:.2f}x | {r['generation_trl_over_plain']:.2f}x |"
        )
    lines += [
        "",
        (
            "Generation: ours = rollout + advantages (sampling with logprobs, env steps with "
            "the sandbox and grader); TRL = `_generate_and_score_completions` (sampling, the "
            "same grader as reward function, advantages); plain = `model.generate` on the "
            "same 16 prompt rows, no logprobs. Update: tokens are the completion tokens "
            "the loss covers; seconds are our update phase and the rest of TRL's optimizer "
            "step. Step = generation + update. Ratios above 1 favour tir-gym."
        ),
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=("tiny", "default"), default=["tiny", "default"]
    )
    parser.add_argument(
        "--steps", type=int, help="steps per block (default: tiny 6, default model 3)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as scratch:
        models = [
            bench_model(
                name, args.steps or {"tiny": 6, "default": 3}[name], args.rounds, Path(scratch)
            )
            for name in args.models
        ]
    report = {
        "machine": machine_info(("torch", "transformers", "trl")),
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps or "tiny 6, default 3",
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "models": models,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vs_trl.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.out / "vs_trl.md")
    logger.info("wrote %s\n%s", args.out / "vs_trl.md", (args.out / "vs_trl.md").read_text())


if __name__ == "__main__":
    main()
