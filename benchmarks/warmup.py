"""The comparison's task and its shared starting point: a tiny model taught the TIR protocol.

The task is a narrow slice of ``TIR-Math-v0``: two procedural kinds (``KINDS``) whose solvers are
one short line around a number of 1-2 tokens copied from the question, and whose answers are 1-2
tokens to copy back from the tool output. Copying a longer number is what a ~1M-parameter model
fails at after a few minutes of warm-up (divisor_count's 8-14 digit inputs, binomial's 20-digit
answers: 0% held-out), so those kinds are left out. The model cannot do the arithmetic in its
head: the tool matters.

The warm-up is supervised: synthetic two-turn traces, made by stepping the real env, so tool
outputs are the env's own observations:

    turn 1  a python block: the problem's solver, or a plausible wrong variant (an off-by-one
            or a wrong formula, ``WRONG``), which runs in the sandbox;
    turn 2  "\\boxed{<what the code printed>}"

and a few one-turn guesses with no tool call (a format penalty, almost always wrong). The mix
(``TRACE_MIX``) leaves the model about half right, so RL has choices to fix, and the choices
live in different turns: guessing is turn 1's, copying the output into the box is turn 2's.

Held-out problems use seeds below ``HELDOUT_SEEDS``; warm-up traces and RL training draw seeds
at or above it (``TrainProblems``), so no held-out problem is ever trained on.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium
import numpy as np
import torch

import tir_envs  # noqa: F401  (registers the env ids)
from algos.rollout import prompt_token_ids
from tests.tiny import tiny_model, tiny_tokenizer
from tir_envs.procedural import ProceduralProblems, from_id
from tir_envs.sandbox import make_sandbox

logger = logging.getLogger("benchmarks.warmup")

KINDS = ("digit_sum", "nth_prime")
HELDOUT_SEEDS = 1000
"""Held-out problems are ``proc/<kind>/<seed>`` with seed < this; training never draws them."""

# Each wrong variant rewrites the correct solver; every one of them runs and prints a number,
# so a wrong trace looks like a confident, well-formed mistake.
WRONG: dict[str, list[tuple[str, str]]] = {
    "nth_prime": [
        (r"prime\((\d+)\)", r"prime(\1 - 1)"),  # off by one
        (r"prime\((\d+)\)", r"prime(\1 + 1)"),
    ],
    "digit_sum": [
        (r"print\(sum\(int\(d\) for d in (str\(.*\))\)\)", r"print(len(\1))"),  # digit count
        (r"factorial\((\d+)\)", r"factorial(\1 - 1)"),
        (r"(\d+) \*\* (\d+)", r"\1 ** (\2 - 1)"),
    ],
}

RECORD = "warmup.json"
SYSTEM_PROMPT = "Solve the problem with Python, then give the answer in \\boxed{}."
"""A one-line system prompt: the default one is ~200 tokens a tiny model cannot use, and
sequence length is most of the cost of every update on a CPU."""
TOOL_TURN = "```python\n{code}\n```\n"
ANSWER_TURN = "\\boxed{{{answer}}}"
"""The final turn; a guess is the same text as a first turn, without the tool."""


@dataclass(frozen=True)
class TraceMix:
    """Fractions of warm-up traces by outcome: the rest run the correct solver."""

    wrong_code: float = 0.4
    guess: float = 0.1


TRACE_MIX = TraceMix()


@dataclass(frozen=True)
class ModelShape:
    """The tiny Llama's size (``tests/tiny.py``'s defaults: ~1.3M parameters, vocab 1024)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 5
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


@dataclass(frozen=True)
class WarmupConfig:
    """What the shared checkpoint is made from; its hash-free identity is this dict, saved beside it."""

    traces: int = 2048
    epochs: int = 12
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    max_turns: int = 2
    mix: TraceMix = TRACE_MIX
    shape: ModelShape = ModelShape()


class TrainProblems(ProceduralProblems):
    """Procedural problems of ``KINDS`` drawn only from seeds >= ``HELDOUT_SEEDS``."""

    def __init__(self):
        super().__init__(KINDS)

    def sample(self, np_random: np.random.Generator):
        kind = self.kinds[int(np_random.integers(len(self.kinds)))]
        return from_id(f"proc/{kind}/{int(np_random.integers(HELDOUT_SEEDS, 2**31))}")


def heldout_ids(per_kind: int) -> list[str]:
    """The fixed held-out problems: seeds 0..per_kind-1 of every kind."""
    if per_kind > HELDOUT_SEEDS:
        raise ValueError(f"at most {HELDOUT_SEEDS} held-out problems per kind")
    return [f"proc/{kind}/{seed}" for seed in range(per_kind) for kind in KINDS]


def wrong_solver(kind: str, solver: str, rng: random.Random) -> str:
    """A plausible wrong program for the problem: one of ``WRONG[kind]`` that applies."""
    options = [(p, r) for p, r in WRONG[kind] if re.search(p, solver)]
    pattern, replacement = rng.choice(options)
    return re.sub(pattern, replacement, solver, count=1)


def make_traces(tokenizer, n: int, mix: TraceMix, seed: int, max_turns: int) -> tuple[list, dict]:
    """``n`` warm-up traces as ``(token ids, loss mask)``, stepped through the real env.

    Token layout matches a rollout's: the prompt as the agent tokenizes it, each turn's text
    tokenized on its own, the env's tool output tokenized on its own, eos after the final turn.
    """
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    source = TrainProblems()
    counts = {"correct_code": 0, "wrong_code": 0, "guess": 0, "correct": 0}
    traces = []
    with make_sandbox("local") as sandbox:
        env = gymnasium.make(
            "TIR-Math-v0", problems=source, tokenizer=tokenizer, sandbox=sandbox,
            system_prompt=SYSTEM_PROMPT, max_turns=max_turns, max_episode_steps=max_turns,
        )
        try:
            for _ in range(n):
                problem = source.sample(np_rng)
                obs, _ = env.reset(options={"problem_id": problem.id})
                ids = prompt_token_ids(tokenizer, obs)
                mask = [0] * len(ids)
                draw = rng.random()
                if draw < mix.guess:
                    style = "guess"
                    digits = max(1, len(problem.answer) + rng.randint(-1, 1))
                    turns = [ANSWER_TURN.format(answer=rng.randrange(10 ** (digits - 1), 10**digits))]
                else:
                    style = "wrong_code" if draw < mix.guess + mix.wrong_code else "correct_code"
                    code = problem.meta["solver"]
                    if style == "wrong_code":
                        code = wrong_solver(problem.meta["kind"], code, rng)
                    turns = [TOOL_TURN.format(code=code)]
                info: dict = {}
                for turn in range(max_turns):
                    text = turns[turn]
                    obs, _, terminated, truncated, info = env.step(text)
                    turn_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    if terminated or truncated:
                        turn_ids = turn_ids + [tokenizer.eos_token_id]
                    ids += turn_ids
                    mask += [1] * len(turn_ids)
                    if terminated or truncated:
                        break
                    if info["exec"]["status"] != "ok":
                        raise RuntimeError(f"warm-up code failed on {problem.id}: {info['exec']}")
                    env_ids = tokenizer(obs, add_special_tokens=False)["input_ids"]
                    ids += env_ids
                    mask += [0] * len(env_ids)
                    printed = info["exec"]["stdout"].strip().splitlines()[-1]
                    turns.append(ANSWER_TURN.format(answer=printed))
                counts[style] += 1
                counts["correct"] += bool(info.get("correct"))
                traces.append((ids, mask))
        finally:
            env.close()
    stats = {**counts, "traces": n, "correct_rate": counts["correct"] / n,
             "mean_tokens": float(np.mean([len(ids) for ids, _ in traces]))}
    return traces, stats


def supervised(model, traces: list, config: WarmupConfig, pad_id: int) -> list[float]:
    """Next-token cross-entropy on the assistant turns only; returns the mean loss per epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(traces) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.05, 1 - step / steps)
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses = []
    for epoch in range(config.epochs):
        order = torch.randperm(len(traces), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            rows = [traces[i] for i in order[start : start + config.batch_size]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (ids, mask) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention[r, : len(ids)] = 1
                labels[r, : len(ids)] = torch.where(
                    torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100
                )
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
        losses.append(total / len(traces))
        logger.info("warm-up epoch %d/%d: loss %.4f", epoch + 1, config.epochs, losses[-1])
    return losses


def warmup_checkpoint(out_dir: Path, config: WarmupConfig) -> Path:
    """The shared starting model under ``out_dir/warmup/model``, made once and then reused.

    A cached checkpoint made with a different ``WarmupConfig`` is an error, not silently reused.
    """
    root = out_dir / "warmup"
    model_dir, record = root / "model", root / RECORD
    wanted = asdict(config)
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["config"] != wanted:
            raise ValueError(
                f"{record} was made with another warm-up config:\n{saved['config']}\nvs\n{wanted}\n"
                "use another --out or delete it"
            )
        logger.info("reusing the warm-up checkpoint %s", model_dir)
        return model_dir
    started = time.perf_counter()
    tokenizer = tiny_tokenizer()
    traces, stats = make_traces(
        tokenizer, config.traces, config.mix, config.seed, config.max_turns
    )
    logger.info("warm-up traces: %s", stats)
    model = tiny_model(config.seed, tokenizer, **asdict(config.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        losses = supervised(model, traces, config, tokenizer.pad_token_id)
    # Written aside and renamed into place: a killed warm-up never leaves a half-made checkpoint.
    tmp = out_dir / "warmup.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    (tmp / RECORD).write_text(json.dumps({
        "config": wanted,
        "traces": stats,
        "loss_per_epoch": losses,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - started,
    }, indent=2) + "\n")
    tmp.rename(root)
    return model_dir
