"""The batched layout of ragged multi-turn trajectories: the one place that defines it.

A batch holds B trajectories. Trajectory i belongs to the prompt group ``group_ids[i]`` and has
T_i >= 1 turns (assistant messages); turn j has a reward r_ij and a span of generated tokens in the
trajectory's token sequence. Two padded views share the same B rows:

Turn level, ``[B, T]`` with T = max_i T_i (padding turns are masked and hold 0)::

    group_ids   long[B]      prompt group; any integers, only equality matters
    rewards     float[B, T]  r_ij, the env's turn reward (sum of its components)
    accuracy    float[B, T]  the accuracy component of r_ij (for min(acc, format) and shaping)
    format      float[B, T]  the format component of r_ij (<= 0: penalties)
    turn_mask   bool[B, T]   True for j < T_i
    infra_error bool[B]      the sandbox failed: excluded from statistics, no advantage, no loss
    correct     bool[B]      the final answer was graded correct
    void        bool[B]      some turn had neither a complete code block nor a final answer

Token level, ``[B, L]`` with L the padded sequence length (prompt, generated turns and tool output
laid end to end, right-padded)::

    loss_mask   bool[B, L]   True on generated tokens of valid trajectories; prompt, tool-output
                             and padding tokens are False, and so is every token of an
                             infra-error trajectory
    turn_index  long[B, L]   j (0-based) of the turn that generated the token, -1 elsewhere

Position t of every token tensor (logprobs, values, advantages) refers to token t of the sequence:
``logprobs[b, t] = log pi(token_t | tokens_<t)``; the trainer shifts logits before filling it.
A turn-level tensor ``x [B, T]`` reaches the tokens with :func:`turn_to_tokens` (a gather), so no
code loops over tokens.

What the batch does not hold travels beside it, one entry per row: each trajectory's code for
shaping (``algos.shaping.join_code`` of its turns' code blocks) and, for PPO, the critic's
``values [B, L]``. Build a batch from per-trajectory lists with :meth:`RolloutBatch.build`, or
from rollouts with :meth:`TokenBatch.build` (the model's padded inputs) and :func:`rollout_batch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from algos.rollout import Trajectory

__all__ = [
    "RolloutBatch",
    "TokenBatch",
    "final_turn_index",
    "final_turn_value",
    "put_on_final_turn",
    "rollout_batch",
    "turn_to_tokens",
]


@dataclass(frozen=True)
class RolloutBatch:
    """Turn- and token-level tensors of B trajectories; see the module docstring for shapes."""

    group_ids: Tensor
    rewards: Tensor
    accuracy: Tensor
    format: Tensor
    turn_mask: Tensor
    infra_error: Tensor
    correct: Tensor
    void: Tensor
    loss_mask: Tensor
    turn_index: Tensor

    @property
    def valid(self) -> Tensor:
        """bool[B]: trajectories that count (not infra errors)."""
        return ~self.infra_error

    def replace(self, **changes: Tensor) -> RolloutBatch:
        """A copy with some fields swapped (the batch itself is immutable)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(
        cls,
        group_ids: Sequence[int],
        turn_rewards: Sequence[Sequence[float]],
        turn_spans: Sequence[Sequence[tuple[int, int]]],
        *,
        seq_len: int | None = None,
        infra_error: Sequence[bool] | None = None,
        correct: Sequence[bool] | None = None,
        turn_accuracy: Sequence[Sequence[float]] | None = None,
        turn_format: Sequence[Sequence[float]] | None = None,
        void: Sequence[bool] | None = None,
    ) -> RolloutBatch:
        """Pad per-trajectory records into a batch.

        ``turn_spans[i][j] = (start, end)`` is the half-open range of turn j's generated tokens in
        trajectory i's sequence; spans are sorted and disjoint (tool output lies between them).
        ``seq_len`` defaults to the largest span end. Missing ``turn_accuracy``/``turn_format``
        are zeros; missing ``correct`` is read off the accuracy of the final turn (> 0); missing
        ``void`` is all False.
        """
        n = len(group_ids)
        if not (len(turn_rewards) == len(turn_spans) == n):
            raise ValueError(
                f"group_ids, turn_rewards and turn_spans differ in length: "
                f"{n}, {len(turn_rewards)}, {len(turn_spans)}"
            )
        counts = list(map(len, turn_rewards))
        if list(map(len, turn_spans)) != counts:
            raise ValueError("each trajectory needs one span per turn reward")
        n_turns = np.array(counts, dtype=np.int64)
        total = int(n_turns.sum())
        T = max(1, int(n_turns.max(initial=0)))
        turn_mask = np.arange(T)[None, :] < n_turns[:, None]

        def pad(rows: Sequence[Sequence[float]] | None, name: str) -> Tensor:
            out = np.zeros((n, T), dtype=np.float32)
            if rows is None:
                return torch.from_numpy(out)
            if list(map(len, rows)) != counts:
                raise ValueError(f"{name} must have one value per turn of each trajectory")
            out[turn_mask] = np.fromiter(chain.from_iterable(rows), np.float32, total)
            return torch.from_numpy(out)

        spans = np.zeros((n, T, 2), dtype=np.int64)
        if total:
            flat = np.fromiter(chain.from_iterable(chain.from_iterable(turn_spans)), np.int64,
                               2 * total).reshape(-1, 2)
            spans[turn_mask] = flat
            starts, ends = flat[:, 0], flat[:, 1]
            if (starts < 0).any() or (ends < starts).any():
                raise ValueError("turn spans must satisfy 0 <= start <= end")
        s, e = spans[..., 0], spans[..., 1]
        if (turn_mask[:, 1:] & (s[:, 1:] < e[:, :-1])).any():
            raise ValueError("turn spans of a trajectory must be sorted and disjoint")
        L = int(e.max(initial=0)) if seq_len is None else seq_len
        if (e > L).any():
            raise ValueError(f"a turn span ends past seq_len={L}")

        # Token t belongs to the last turn j with start_j <= t, if t < end_j (a binary search
        # per token over the row's sorted starts; padding turns start past the end).
        starts = torch.from_numpy(np.where(turn_mask, s, L + 1))
        pos = torch.arange(L).expand(n, L).contiguous()
        j = torch.searchsorted(starts, pos, right=True) - 1
        generated = (j >= 0) & (pos < torch.from_numpy(e).gather(1, j.clamp(min=0)))
        turn_index = torch.where(generated, j, -1)

        infra = torch.zeros(n, dtype=torch.bool)
        if infra_error is not None:
            infra = torch.as_tensor(list(infra_error), dtype=torch.bool)
        accuracy = pad(turn_accuracy, "turn_accuracy")
        tm = torch.from_numpy(turn_mask)
        if correct is None:
            correct_t = final_turn_value(accuracy, tm) > 0
        else:
            correct_t = torch.as_tensor(list(correct), dtype=torch.bool)
        return cls(
            group_ids=torch.as_tensor(list(group_ids), dtype=torch.long),
            rewards=pad(turn_rewards, "turn_rewards"),
            accuracy=accuracy,
            format=pad(turn_format, "turn_format"),
            turn_mask=tm,
            infra_error=infra,
            correct=correct_t,
            void=torch.zeros(n, dtype=torch.bool) if void is None
            else torch.as_tensor(list(void), dtype=torch.bool),
            loss_mask=generated & ~infra[:, None],
            turn_index=turn_index,
        )


def turn_to_tokens(x: Tensor, turn_index: Tensor) -> Tensor:
    """Broadcast a turn-level ``x [B, T]`` to tokens ``[B, L]``: 0 where ``turn_index < 0``."""
    padded = torch.nn.functional.pad(x, (1, 0))  # column 0 holds the 0 of "no turn"
    return padded.gather(1, turn_index + 1)


def final_turn_index(turn_mask: Tensor) -> Tensor:
    """long[B]: index of each trajectory's last turn (0 for a trajectory without turns)."""
    return (turn_mask.sum(1) - 1).clamp(min=0)


def final_turn_value(x: Tensor, turn_mask: Tensor) -> Tensor:
    """``x [B, T]`` read at each trajectory's final turn: ``[B]``."""
    return x.gather(1, final_turn_index(turn_mask)[:, None]).squeeze(1)


def put_on_final_turn(values: Tensor, turn_mask: Tensor) -> Tensor:
    """``[B, T]``: ``values [B]`` on each trajectory's final turn, 0 elsewhere."""
    out = torch.zeros(turn_mask.shape, dtype=values.dtype)
    last = final_turn_index(turn_mask)[:, None]
    return out.scatter(1, last, values[:, None]) * turn_mask


@dataclass
class TokenBatch:
    """Padded token tensors of B trajectories, aligned with a ``RolloutBatch``."""

    input_ids: Tensor  # long[B, L], right-padded
    attention_mask: Tensor  # long[B, L]
    old_logprobs: Tensor  # float[B, L], sampling logprobs on generated tokens, 0 elsewhere

    @classmethod
    def build(cls, trajectories: Sequence[Trajectory], pad_id: int) -> tuple[TokenBatch, list]:
        """The tensors plus each trajectory's per-turn spans of generated tokens."""
        width = max(len(t.token_ids) for t in trajectories)
        n = len(trajectories)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        old_logprobs = torch.zeros((n, width))
        spans = []
        for row, trajectory in enumerate(trajectories):
            ids = trajectory.token_ids
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            attention_mask[row, : len(ids)] = 1
            pos, row_spans = len(trajectory.prompt_ids), []
            for turn in trajectory.turns:
                end = pos + len(turn.generated_ids)
                old_logprobs[row, pos:end] = torch.as_tensor(turn.logprobs)
                row_spans.append((pos, end))
                pos = end + len(turn.env_ids)
            spans.append(row_spans)
        return cls(input_ids, attention_mask, old_logprobs), spans


def rollout_batch(trajectories: Sequence[Trajectory], spans: list, seq_len: int) -> RolloutBatch:
    """The turn-level view of the trajectories, token spans from ``TokenBatch.build``."""

    def component(name: str) -> list[list[float]]:
        return [
            [float(t.info.get("reward_components", {}).get(name, 0.0)) for t in traj.turns]
            for traj in trajectories
        ]

    return RolloutBatch.build(
        group_ids=[t.group_id for t in trajectories],
        turn_rewards=[t.rewards for t in trajectories],
        turn_spans=spans,
        seq_len=seq_len,
        infra_error=[t.infra_error for t in trajectories],
        correct=[t.correct for t in trajectories],
        void=[t.has_void_turn for t in trajectories],
        turn_accuracy=component("accuracy"),
        turn_format=component("format"),
    )
