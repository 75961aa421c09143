"""Supervised cold start: teach a model the TIR protocol on synthetic traces before RL.

A small model that never saw the protocol almost never calls the tool and answers in ``\\boxed{}``,
so RL from it has no successes to reinforce. The warm-up fixes that with a few minutes of
supervised fine-tuning on traces built from the procedural problems' own solutions, made by
stepping the real env (tool outputs are the env's own observations, tokenized as a rollout
tokenizes them):

    turn 1  a python block: the problem's solver, or a plausible wrong variant (an off-by-one or
            a wrong formula, ``WRONG``), which runs in the sandbox;
    turn 2  "\\boxed{<what the code printed>}"

and a few one-turn guesses with no tool call (a format penalty, almost always wrong). The mix
(``TraceMix``) leaves the model about half right, so RL has choices to fix, and they live in
different turns: guessing is turn 1's, copying the output into the box is turn 2's.

Splits: held-out test problems are ``proc/<kind>/<seed>`` with seed < ``VALIDATION_SEEDS``, a
validation split (for tuning) uses seeds in ``[VALIDATION_SEEDS, HELDOUT_SEEDS)``, and warm-up
traces and RL training draw seeds >= ``HELDOUT_SEEDS`` (``ProceduralProblems.sample``).

Determinism: the same ``WarmupConfig`` on the same machine rebuilds a bit-identical checkpoint
(seeded traces and shuffles, a fixed torch thread count, ``torch.use_deterministic_algorithms``);
the record beside the checkpoint carries the sha256 of its weights (``weights_sha256``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch

import tir_envs  # noqa: F401  (registers the env ids)
from algos.rollout import prompt_token_ids
from tir_envs.procedural import HELDOUT_SEEDS, ProceduralProblems
from tir_envs.sandbox import make_sandbox

logger = logging.getLogger(__name__)

VALIDATION_SEEDS = 500
"""First seed of the validation split (tuning happens there, never on the test problems): the
held-out seeds below ``HELDOUT_SEEDS`` split into ``[0, VALIDATION_SEEDS)`` test and the rest."""

SYSTEM_PROMPT = "Solve the problem with Python, then give the answer in \\boxed{}."
"""A one-line system prompt: the env's default is ~200 tokens, and on a CPU sequence length is
most of the cost of every SFT step, rollout and update."""
TOOL_TURN = "```python\n{code}\n```\n"
ANSWER_TURN = "\\boxed{{{answer}}}"
"""The final turn; a guess is the same text as a first turn, without the tool."""
RECORD = "warmup.json"

# Each wrong variant rewrites the correct solver (``meta["solver"]``); every one runs and prints
# a number, so a wrong trace looks like a confident, well-formed mistake.
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
    "modpow": [
        (r"pow\((\d+), (\d+), (\d+)\)", r"pow(\1, \2 - 1, \3)"),
        (r"pow\((\d+), (\d+), (\d+)\)", r"pow(\1, \2 + 1, \3)"),
    ],
    "binomial": [
        (r"comb\((\d+), (\d+)\)", r"comb(\1, \2 - 1)"),
        (r"comb\((\d+), (\d+)\)", r"comb(\1 - 1, \2)"),
    ],
    "gcd_lcm": [
        (r"math\.gcd\(", r"math.lcm("),
        (r"math\.lcm\(([^)]*), (\d+)\)", r"math.lcm(\1)"),  # forgets the last number
    ],
    "divisor_count": [
        (r"sympy\.divisor_count\((\d+)\)", r"sympy.divisor_count(\1) - 1"),
        (r"sympy\.divisor_count\((\d+)\)", r"sympy.totient(\1)"),
    ],
}


@dataclass(frozen=True)
class TraceMix:
    """Fractions of warm-up traces by outcome: the rest run the correct solver."""

    wrong_code: float = 0.4
    guess: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.wrong_code and 0 <= self.guess and self.wrong_code + self.guess <= 1):
            raise ValueError(f"trace fractions must be >= 0 and sum to <= 1: {self}")


MAIN_KINDS = ("digit_sum", "nth_prime", "modpow", "binomial")
"""The procedural kinds of ``tir train``'s warm-up and RL: one-line solvers around numbers
copied from the question, each with plausible wrong variants in ``WRONG``."""


@dataclass(frozen=True)
class WarmupConfig:
    """What ``tir train``'s warm-up checkpoint is made from; this dict is its identity (a cached
    checkpoint made from another one is an error, never silently reused)."""

    kinds: tuple[str, ...] = MAIN_KINDS
    traces: int = 256
    """Synthetic traces made by stepping the env (two turns, ~70 tokens each with SmolLM2)."""
    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-5
    """AdamW peak learning rate (linear ramp over min(20, steps / 10) steps, then linear decay)."""
    seed: int = 0
    max_turns: int = 2
    mix: TraceMix = TraceMix()
    system_prompt: str = SYSTEM_PROMPT
    threads: int = 2
    """torch threads during SFT: a float sum depends on how it is split, so the thread count is
    part of what makes the checkpoint reproducible."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in WRONG]
        if unknown:
            raise ValueError(f"no wrong variants for kinds {unknown}; known: {sorted(WRONG)}")
        if min(self.traces, self.epochs, self.batch_size, self.threads) < 1 or self.lr <= 0:
            raise ValueError(f"traces, epochs, batch_size, threads and lr must be positive: {self}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kinds"] = list(self.kinds)
        return data


def heldout_ids(kinds: Sequence[str], per_kind: int, split: str = "test") -> list[str]:
    """Fixed held-out problems, ``per_kind`` of each kind: seeds from 0 (``test``) or from
    ``VALIDATION_SEEDS`` (``validation``); the two never overlap and training never draws either."""
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    first = 0 if split == "test" else VALIDATION_SEEDS
    if per_kind > VALIDATION_SEEDS:
        raise ValueError(f"at most {VALIDATION_SEEDS} held-out problems per kind and split")
    return [f"proc/{kind}/{first + i}" for i in range(per_kind) for kind in kinds]


def wrong_solver(kind: str, solver: str, rng: random.Random) -> str:
    """A plausible wrong program for the problem: one of ``WRONG[kind]`` that applies."""
    options = [(p, r) for p, r in WRONG[kind] if re.search(p, solver)]
    pattern, replacement = rng.choice(options)
    return re.sub(pattern, replacement, solver, count=1)


def make_traces(
    tokenizer, n: int, *, kinds: Sequence[str], mix: TraceMix = TraceMix(), seed: int = 0,
    max_turns: int = 2, system_prompt: str = SYSTEM_PROMPT, min_seed: int = HELDOUT_SEEDS,
) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """``n`` warm-up traces as ``(token ids, loss mask)``, stepped through the real env.

    Token layout matches a rollout's: the prompt as the agent tokenizes it, each turn's text
    tokenized on its own, the env's tool output tokenized on its own, eos after the final turn.
    """
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    source = ProceduralProblems(kinds, min_seed)
    counts = {"correct_code": 0, "wrong_code": 0, "guess": 0, "correct": 0}
    traces = []
    with make_sandbox("local") as sandbox:
        env = gymnasium.make(
            "TIR-Math-v0", problems=source, tokenizer=tokenizer, sandbox=sandbox,
            system_prompt=system_prompt, max_turns=max_turns, max_episode_steps=max_turns,
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
                    guess = rng.randrange(10 ** (digits - 1), 10**digits)
                    turns = [ANSWER_TURN.format(answer=guess)]
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


@contextlib.contextmanager
def deterministic(threads: int, seed: int) -> Iterator[None]:
    """Bit-reproducible CPU training inside: fixed threads, deterministic kernels, seeded torch
    RNG; the caller's settings and RNG state are restored on exit."""
    old_threads = torch.get_num_threads()
    old_flag = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(old_flag, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def supervised(
    model, traces: list, *, epochs: int, batch_size: int, lr: float, seed: int, pad_id: int,
    warmup_steps: int = 20, progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Next-token cross-entropy on the assistant turns only; returns the mean loss per epoch.

    The LM head runs only from the position before the first trained token on (prompts are most
    of a trace, and on SmolLM2 the 49k-wide head is a fifth of the compute).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(traces) / batch_size)
    ramp = max(1, min(warmup_steps, steps // 10))  # a short run still reaches its peak lr
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / ramp) * max(0.05, 1 - step / steps)
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses, done = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(traces), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = [traces[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (ids, trace_mask) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention[r, : len(ids)] = 1
                mask[r, : len(ids)] = torch.tensor(trace_mask, dtype=torch.bool)
            first = int(mask.float().argmax(1).min())
            keep = width - max(first - 1, 0)
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False,
                           logits_to_keep=keep).logits
            offset = width - keep
            target = mask[:, offset + 1 :]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1][target].float(), input_ids[:, offset + 1 :][target]
            )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
            done += 1
            if done % 4 == 0 or done == steps:
                logger.info("warm-up step %d/%d: loss %.4f", done, steps, loss.item())
            if progress is not None:
                progress(done, steps)
        losses.append(total / len(traces))
        logger.info("warm-up epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    model.eval()
    return losses


def weights_sha256(model) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cached_checkpoint(root: Path, identity: dict, build: Callable[[Path], dict]) -> Path:
    """``root/model``, built once by ``build(model_dir) -> record`` and reused afterwards.

    The record (with ``identity`` as its ``config``) is saved as ``root/warmup.json``. The build
    writes aside and is renamed into place, so a killed warm-up never leaves a half-made
    checkpoint; a cached one made from another identity is an error.
    """
    model_dir, record = root / "model", root / RECORD
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["config"] != identity:
            raise ValueError(
                f"{record} was made with another warm-up config:\n{saved['config']}\nvs\n"
                f"{identity}\nuse another directory or delete it"
            )
        logger.info("reusing the warm-up checkpoint %s", model_dir)
        return model_dir
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    info = build(tmp / "model")
    info = {"config": identity, **info, "seconds": round(time.perf_counter() - started, 1)}
    (tmp / RECORD).write_text(json.dumps(info, indent=2) + "\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return model_dir


def train_and_save(model, tokenizer, traces: list, stats: dict, *, epochs: int, batch_size: int,
                   lr: float, seed: int, threads: int, model_dir: Path) -> dict:
    """SFT ``model`` in place, deterministically, and save it with ``tokenizer``; the record."""
    pad = tokenizer.pad_token_id
    pad_id = pad if pad is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with deterministic(threads, seed):
        losses = supervised(model, traces, epochs=epochs, batch_size=batch_size, lr=lr,
                            seed=seed, pad_id=pad_id)
    sft_seconds = time.perf_counter() - started
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {
        "traces": stats,
        "loss_per_epoch": losses,
        "sft_seconds": round(sft_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": weights_sha256(model),
    }


def warm_up(model, tokenizer, config: WarmupConfig, root: Path) -> Path:
    """Warm ``model`` up on ``config``'s traces (in place) and save it as ``root/model``; a
    checkpoint already there from the same config is reused and ``model`` left untouched."""

    def build(model_dir: Path) -> dict:
        started = time.perf_counter()
        traces, stats = make_traces(
            tokenizer, config.traces, kinds=config.kinds, mix=config.mix, seed=config.seed,
            max_turns=config.max_turns, system_prompt=config.system_prompt,
        )
        stats["seconds"] = round(time.perf_counter() - started, 1)
        logger.info("warm-up traces: %s", stats)
        return train_and_save(model, tokenizer, traces, stats, epochs=config.epochs,
                              batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                              threads=config.threads, model_dir=model_dir)

    return cached_checkpoint(root, config.to_dict(), build)
