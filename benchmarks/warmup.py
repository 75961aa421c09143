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
at or above it (``train_problems``), so no held-out problem is ever trained on.

Trace making, the supervised loop and the checkpoint cache are ``algos.warmup``'s (the main job's
cold start uses them too); this module keeps the comparison's task, its tiny model and its names.
The checkpoint is bit-reproducible: the same ``WarmupConfig`` rebuilds the same weights, whose
sha256 is in the record beside them.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from algos import warmup as lib
from algos.tiny import tiny_model, tiny_tokenizer
from algos.warmup import ANSWER_TURN, HELDOUT_SEEDS, RECORD, SYSTEM_PROMPT, TOOL_TURN, TraceMix
from tir_envs.procedural import ProceduralProblems

logger = logging.getLogger("benchmarks.warmup")

__all__ = [
    "ANSWER_TURN", "HELDOUT_SEEDS", "KINDS", "RECORD", "SYSTEM_PROMPT", "TOOL_TURN", "TRACE_MIX",
    "WRONG", "ModelShape", "TraceMix", "train_problems", "WarmupConfig", "heldout_ids",
    "make_traces", "supervised", "warmup_checkpoint", "wrong_solver",
]

KINDS = ("digit_sum", "nth_prime")
WRONG = {kind: lib.WRONG[kind] for kind in KINDS}
TRACE_MIX = TraceMix()


@dataclass(frozen=True)
class ModelShape:
    """The tiny Llama's size (``algos/tiny.py``'s defaults: ~1.3M parameters, vocab 1024)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 5
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


@dataclass(frozen=True)
class WarmupConfig:
    """What the shared checkpoint is made from; this dict is its identity, saved beside it."""

    traces: int = 2048
    epochs: int = 12
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    max_turns: int = 2
    mix: TraceMix = TRACE_MIX
    shape: ModelShape = ModelShape()
    threads: int = 1
    """torch threads of the supervised loop: part of what makes the weights reproducible."""


def train_problems() -> ProceduralProblems:
    """Procedural problems of ``KINDS``, drawn only from seeds >= ``HELDOUT_SEEDS``."""
    return ProceduralProblems(KINDS, HELDOUT_SEEDS)


def heldout_ids(per_kind: int) -> list[str]:
    """The fixed held-out problems: seeds 0..per_kind-1 of every kind."""
    if per_kind > HELDOUT_SEEDS:
        raise ValueError(f"at most {HELDOUT_SEEDS} held-out problems per kind")
    return [f"proc/{kind}/{seed}" for seed in range(per_kind) for kind in KINDS]


def wrong_solver(kind: str, solver: str, rng: random.Random) -> str:
    """A plausible wrong program for the problem: one of ``WRONG[kind]`` that applies."""
    return lib.wrong_solver(kind, solver, rng)


def make_traces(tokenizer, n: int, mix: TraceMix, seed: int, max_turns: int) -> tuple[list, dict]:
    """``n`` warm-up traces of ``KINDS`` as ``(token ids, loss mask)``: ``algos.warmup``'s."""
    return lib.make_traces(tokenizer, n, kinds=KINDS, mix=mix, seed=seed, max_turns=max_turns,
                           system_prompt=SYSTEM_PROMPT)


def supervised(model, traces: list, config: WarmupConfig, pad_id: int) -> list[float]:
    """Next-token cross-entropy on the assistant turns only; returns the mean loss per epoch."""
    return lib.supervised(model, traces, epochs=config.epochs, batch_size=config.batch_size,
                          lr=config.lr, seed=config.seed, pad_id=pad_id)


def warmup_checkpoint(out_dir: Path, config: WarmupConfig) -> Path:
    """The shared starting model under ``out_dir/warmup/model``, made once and then reused.

    A cached checkpoint made with a different ``WarmupConfig`` is an error, not silently reused.
    """

    def build(model_dir: Path) -> dict:
        tokenizer = tiny_tokenizer()
        traces, stats = make_traces(tokenizer, config.traces, config.mix, config.seed,
                                    config.max_turns)
        logger.info("warm-up traces: %s", stats)
        with lib.deterministic(config.threads, config.seed):
            model = tiny_model(config.seed, tokenizer, **asdict(config.shape))
        return lib.train_and_save(model, tokenizer, traces, stats, epochs=config.epochs,
                                  batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                                  threads=config.threads, model_dir=model_dir)

    return lib.cached_checkpoint(out_dir / "warmup", asdict(config), build)
