"""Turn-level rewards: every turn of a TIR episode gets its own reward, made of named components.

The env builds a ``TurnOutcome`` for each step and asks a reward function for its components; the
step reward is their sum and ``info["reward_components"]`` holds them. Any callable
``(TurnOutcome) -> Mapping[str, float]`` can replace the default ``TurnReward``, e.g. to add a
length cost on top of it::

    base = TurnReward()
    length_cost = lambda o: {**base(o), "length": -1e-4 * len(o.action)}
    env = gymnasium.make("TIR-Math-v0", reward_fn=length_cost)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tir_envs.data import Problem


@dataclass(frozen=True)
class TurnOutcome:
    """Everything the env knows about one turn, for reward functions to read."""

    problem: Problem
    action: str
    turn: int
    """1-based index of this turn in the episode."""
    tool_called: bool
    format_error: str | None
    """``unclosed_fence``, ``empty_code``, ``syntax_error``, ``action_too_long`` or None."""
    exec_status: str | None
    """The sandbox status of this turn's code, None when nothing ran."""
    final: bool
    final_answer: str | None
    correct: bool | None
    """Grading verdict on the final turn, None on tool turns."""


RewardFn = Callable[[TurnOutcome], Mapping[str, float]]


@dataclass(frozen=True)
class TurnReward:
    """The paper's turn rewards (GTPO, arXiv 2511.14846); each weight is a knob for ablations.

    Components, always all present so vector envs can stack them:

    - ``accuracy``: ``correct`` on a final turn whose answer is right, ``incorrect`` on any other
      final turn, 0 on tool turns.
    - ``format``: ``invalid_tool_call`` for an unclosed fence, empty code, code that does not parse,
      or a turn over the env's length cap (which is not parsed at all); ``no_tool_call`` on a first
      turn that answers without calling the tool (the task is to use it).
    - ``execution``: ``exec_error`` when valid code fails (error, timeout, memory, output limit). 0
      by default, as in the paper: a failed run is information, not a mistake. The sandbox's own
      ``infra_error`` is never charged.
    """

    correct: float = 1.0
    incorrect: float = 0.0
    invalid_tool_call: float = -0.1
    no_tool_call: float = -0.1
    exec_error: float = 0.0

    def __call__(self, outcome: TurnOutcome) -> dict[str, float]:
        accuracy = 0.0
        if outcome.final:
            accuracy = self.correct if outcome.correct else self.incorrect
        fmt = 0.0
        if outcome.format_error is not None:
            fmt = self.invalid_tool_call
        elif outcome.turn == 1 and not outcome.tool_called:
            fmt = self.no_tool_call
        failed = outcome.format_error is None and outcome.exec_status not in (
            None,
            "ok",
            "infra_error",
        )
        return {
            "accuracy": float(accuracy),
            "format": float(fmt),
            "execution": float(self.exec_error if failed else 0.0),
        }
