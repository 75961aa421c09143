"""Turn-level reward components: the paper's defaults and every weight as a knob."""

from __future__ import annotations

import dataclasses

import pytest

from tir_envs.data import Problem
from tir_envs.rewards import TurnOutcome, TurnReward

PROBLEM = Problem(id="t/1", question="1+1?", answer="2", source="test", meta={})


def outcome(**changes) -> TurnOutcome:
    base = TurnOutcome(
        problem=PROBLEM,
        action="",
        turn=2,
        tool_called=True,
        format_error=None,
        exec_status="ok",
        final=False,
        final_answer=None,
        correct=None,
    )
    return dataclasses.replace(base, **changes)


def final(correct: bool, turn: int = 2) -> TurnOutcome:
    return outcome(
        turn=turn,
        tool_called=False,
        exec_status=None,
        final=True,
        final_answer="2",
        correct=correct,
    )


@pytest.mark.parametrize(
    "case, expected",
    [
        (outcome(), {"accuracy": 0.0, "format": 0.0, "execution": 0.0}),
        (final(True), {"accuracy": 1.0, "format": 0.0, "execution": 0.0}),
        (final(False), {"accuracy": 0.0, "format": 0.0, "execution": 0.0}),
        (final(True, turn=1), {"accuracy": 1.0, "format": -0.1, "execution": 0.0}),
        (final(False, turn=1), {"accuracy": 0.0, "format": -0.1, "execution": 0.0}),
        (
            outcome(format_error="unclosed_fence", exec_status=None),
            {"accuracy": 0.0, "format": -0.1, "execution": 0.0},
        ),
        (
            outcome(format_error="empty_code", exec_status=None, turn=1),
            {"accuracy": 0.0, "format": -0.1, "execution": 0.0},
        ),
        (
            outcome(format_error="syntax_error", exec_status="error"),
            {"accuracy": 0.0, "format": -0.1, "execution": 0.0},
        ),
        (
            outcome(format_error="action_too_long", tool_called=False, exec_status=None, turn=1),
            {"accuracy": 0.0, "format": -0.1, "execution": 0.0},
        ),
        (outcome(exec_status="error"), {"accuracy": 0.0, "format": 0.0, "execution": 0.0}),
        (
            outcome(exec_status="infra_error", turn=1),
            {"accuracy": 0.0, "format": 0.0, "execution": 0.0},
        ),
    ],
)
def test_paper_defaults(case, expected):
    assert TurnReward()(case) == expected


def test_every_weight_is_a_knob():
    reward = TurnReward(
        correct=2.0, incorrect=-1.0, invalid_tool_call=-0.5, no_tool_call=-0.3, exec_error=-0.2
    )
    assert reward(final(True))["accuracy"] == 2.0
    assert reward(final(False))["accuracy"] == -1.0
    assert reward(final(False, turn=1))["format"] == -0.3
    assert reward(outcome(format_error="empty_code", exec_status=None))["format"] == -0.5
    for status in ("error", "timeout", "memory", "output_limit"):
        assert reward(outcome(exec_status=status))["execution"] == -0.2
    assert reward(outcome(exec_status="infra_error"))["execution"] == 0.0
    assert reward(outcome(exec_status="ok"))["execution"] == 0.0
    # A syntax error is a format mistake, not also an execution one.
    assert reward(outcome(format_error="syntax_error", exec_status="error"))["execution"] == 0.0
