"""Advantage estimators as pure tensor functions, registered by name.

Every estimator maps a :class:`~algos.batch.RolloutBatch` (and, for critics, token values) to
per-token advantages ``[B, L]`` that are 0 off the generated tokens and on infra-error rows.
A new algorithm adds one::

    @register_advantage("mine")
    def mine(batch, cfg, values=None) -> Advantages: ...

and selects it with ``cfg.advantage = "mine"``. The math lives in small functions below
(``group_normalize``, ``discounted_cumsum``, ``gae``) that the tests check against hand-computed
tables; the registered functions only wire config fields into them.

Conventions shared by all estimators:

- Trajectories with ``infra_error`` take no part in any mean or std and get advantage 0.
- A normalisation set whose values are all equal (a group where every rollout scored the same)
  gives advantage 0 exactly: it carries no preference, and there is no 0/0.
- Standard deviations are unbiased (n - 1), as ``torch.std`` in TRL and verl; a set of one value
  has no spread and gets advantage 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from algos.batch import RolloutBatch, put_on_final_turn, turn_to_tokens
from tir_envs.registry import Registry

if TYPE_CHECKING:
    from algos.config import AlgoConfig

__all__ = [
    "ADVANTAGES",
    "GTPO_SCOPES",
    "Advantages",
    "Estimator",
    "check_config",
    "discounted_cumsum",
    "gae",
    "get_advantage",
    "group_normalize",
    "masked_whiten",
    "gtpo_turn_advantages",
    "grpo_advantages",
    "register_advantage",
    "rewards_on_last_tokens",
    "trajectory_reward",
    "turn_level_rewards",
]


class Advantages(NamedTuple):
    """What an estimator returns."""

    tokens: Tensor
    """float[B, L]: the advantage of every token; 0 on tokens that were not generated and on
    infra-error trajectories."""
    turns: Tensor | None = None
    """float[B, T]: the per-turn advantage, for estimators that have one (logging, tests)."""
    returns: Tensor | None = None
    """float[B, L]: value-loss targets, for estimators with a critic."""


AdvantageFn = Callable[[RolloutBatch, "AlgoConfig", "Tensor | None"], Advantages]


class Estimator(NamedTuple):
    """A registered advantage estimator and what it needs from a config."""

    fn: AdvantageFn
    reads: tuple[str, ...] = ()
    """The config fields it reads beyond ``AlgoConfig``'s own."""
    check: Callable[[AlgoConfig], None] | None = None
    """Rejects config values it cannot use (raises ``ValueError``)."""


ADVANTAGES: Registry[Estimator] = Registry("advantage estimator")


def register_advantage(
    name: str, *, reads: tuple[str, ...] = (), check: Callable[[AlgoConfig], None] | None = None,
) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(batch, cfg, values=None) -> Advantages`` under ``name``.

    ``reads`` names the config fields the estimator reads that not every config has, and
    ``check(cfg)`` rejects values it cannot use: configs run both when they are built
    (:func:`check_config`), so ``PPOConfig(advantage="grpo")`` fails there, not mid-run.
    """

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES.register(name, Estimator(fn, tuple(reads), check))
        return fn

    return decorator


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered under ``name``."""
    return ADVANTAGES.get(name).fn


def check_config(cfg: AlgoConfig) -> None:
    """Raise ``ValueError`` unless ``cfg`` has every field its estimator reads, with usable values."""
    name = cfg.advantage
    if name not in ADVANTAGES:
        raise ValueError(f"advantage={name!r} is not registered; known: {sorted(ADVANTAGES)}")
    estimator = ADVANTAGES.get(name)
    missing = [f for f in estimator.reads if not hasattr(cfg, f)]
    if missing:
        raise ValueError(
            f"advantage={name!r} reads config fields {missing} that {type(cfg).__name__} does "
            f"not have; use a config class that defines them (e.g. the one of the algorithm "
            f"named {name!r})"
        )
    if estimator.check is not None:
        estimator.check(cfg)


def _scope_check(allowed: tuple[str, ...]) -> Callable[[AlgoConfig], None]:
    def check(cfg: AlgoConfig) -> None:
        if cfg.norm_scope not in allowed:
            raise ValueError(f"advantage={cfg.advantage!r} needs norm_scope in {allowed}, "
                             f"got {cfg.norm_scope!r}")

    return check


# --------------------------------------------------------------------------- building blocks


def trajectory_reward(
    rewards: Tensor, turn_mask: Tensor, mode: str = "sum",
    accuracy: Tensor | None = None, format: Tensor | None = None,
) -> Tensor:
    """One reward per trajectory, ``[B]``, from turn rewards ``[B, T]``.

    ``sum``: sum of the turn rewards. ``min_acc_format``: the GTPO paper's GRPO baseline,
    min(r_acc, r_fmt) with a binary format term (1 when no turn was penalised, else 0), so a
    trajectory with any format fault scores 0 whatever its answer and a clean one scores its
    accuracy. ``min_acc_penalty``: min(accuracy, summed penalty) when a turn was penalised, else
    the accuracy; a faulty trajectory then ranks below a clean wrong one.
    """
    if mode == "sum":
        return (rewards * turn_mask).sum(1)
    if mode in ("min_acc_format", "min_acc_penalty"):
        if accuracy is None or format is None:
            raise ValueError(f"{mode} needs the accuracy and format components")
        acc = (accuracy * turn_mask).sum(1)
        fmt = (format * turn_mask).sum(1)
        fault = torch.minimum(acc, fmt) if mode == "min_acc_penalty" else acc.clamp(max=0)
        return torch.where(fmt < 0, fault, acc)
    raise ValueError(f"unknown trajectory reward mode {mode!r}")


def turn_level_rewards(batch: RolloutBatch, turn_rewards: bool, mode: str) -> Tensor:
    """The ``[B, T]`` rewards an estimator sees: the env's turn rewards, or (turn rewards off)
    the trajectory reward on the final turn and 0 on the others."""
    if turn_rewards:
        return batch.rewards * batch.turn_mask
    traj = trajectory_reward(batch.rewards, batch.turn_mask, mode, batch.accuracy, batch.format)
    return put_on_final_turn(traj, batch.turn_mask)


def _segment_sum(x: Tensor, seg: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=x.dtype).index_add_(0, seg, x)


def group_normalize(
    x: Tensor, segments: Tensor, valid: Tensor, scope: str = "group", eps: float = 1e-6,
) -> Tensor:
    """Normalise values ``x [N]`` within segments (groups of comparable values).

    ``scope``: ``group`` (x - mean_seg) / (std_seg + eps); ``batch`` (x - mean_seg) /
    (std_batch + eps), the std over all valid values (Lite PPO); ``none`` x - mean_seg (Dr.GRPO).
    ``segments`` are any integer ids; entries with ``valid`` False are ignored and get 0, and a
    segment whose valid values are all equal gets 0. "Equal" allows float rounding
    (``FLAT_TOLERANCE``): 0.9 * 1.0 and 1.0 - 0.1 are the same reward, and a z-score would blow
    their 1e-8 difference up to +-0.7. One vectorised pass: no loop over segments.
    """
    if scope not in ("group", "batch", "none"):
        raise ValueError(f"unknown normalisation scope {scope!r}")
    out = torch.zeros_like(x)
    if not bool(valid.any()):
        return out
    v = x[valid]
    _, seg = torch.unique(segments[valid], return_inverse=True)
    n = int(seg.max()) + 1
    count = _segment_sum(torch.ones_like(v), seg, n)
    centered = v - (_segment_sum(v, seg, n) / count)[seg]
    high = torch.full((n,), -torch.inf, dtype=v.dtype).scatter_reduce(0, seg, v, "amax")
    low = torch.full((n,), torch.inf, dtype=v.dtype).scatter_reduce(0, seg, v, "amin")
    size = torch.maximum(high.abs(), low.abs()).clamp(min=1.0)
    flat = (high - low <= FLAT_TOLERANCE * size)[seg]
    if scope == "group":
        var = _segment_sum(centered**2, seg, n) / (count - 1).clamp(min=1)
        adv = centered / (var.sqrt() + eps)[seg]
    elif scope == "batch":
        adv = centered / (v.std() + eps) if v.numel() > 1 else torch.zeros_like(v)
    else:
        adv = centered
    out[valid] = torch.where(flat, torch.zeros((), dtype=v.dtype), adv)
    return out


FLAT_TOLERANCE = 1e-6
"""Values of a segment within this (relative to max(1, |value|)) of each other count as equal."""


def group_normalize_reference(
    x: Tensor, segments: Tensor, valid: Tensor, scope: str = "group", eps: float = 1e-6,
) -> Tensor:
    """``group_normalize`` as a loop over segments: its readable definition (tests check that
    the vectorised pass equals it)."""
    out = torch.zeros_like(x)
    v = x[valid]
    batch_std = v.std() if v.numel() > 1 else torch.zeros((), dtype=x.dtype)
    for segment in segments[valid].unique():
        members = valid & (segments == segment)
        values = x[members]
        size = max(1.0, float(values.abs().max()))
        if float(values.max() - values.min()) <= FLAT_TOLERANCE * size:
            continue  # every member scored alike: no preference, 0
        centered = values - values.mean()
        if scope == "group":
            centered = centered / (values.std() + eps)
        elif scope == "batch":
            centered = centered / (batch_std + eps)
        out[members] = centered
    return out


def discounted_cumsum(x: Tensor, discount: float, block: int = 64) -> Tensor:
    """Reverse discounted cumulative sum along the last axis: y_k = sum_{m>=k} d^(m-k) x_m.

    Computed as two small triangular matmuls (within blocks of ``block`` steps, then across
    blocks with discount d^block), so there is no Python loop over steps and the cost is
    O(N * block) per row rather than O(N^2).
    """
    *lead, n = x.shape
    k = min(block, max(n, 1))
    nb = -(-n // k)
    xb = torch.nn.functional.pad(x, (0, nb * k - n)).reshape(*lead, nb, k)
    within = xb @ _discount_matrix(discount, k, x.dtype)  # y restricted to each block
    starts = within[..., 0] @ _discount_matrix(discount**k, nb, x.dtype)  # y at block starts
    after = torch.nn.functional.pad(starts[..., 1:], (0, 1))  # y at the next block's start
    tail = discount ** torch.arange(k, 0, -1, dtype=torch.float64)  # d^(k - i)
    y = within + after[..., None] * tail.to(x.dtype)
    return y.reshape(*lead, nb * k)[..., :n]


def discounted_cumsum_reference(x: Tensor, discount: float) -> Tensor:
    """``discounted_cumsum`` as the loop it replaces: its readable definition."""
    out, acc = torch.zeros_like(x), torch.zeros_like(x[..., 0])
    for k in reversed(range(x.shape[-1])):
        acc = x[..., k] + discount * acc
        out[..., k] = acc
    return out


def _discount_matrix(d: float, n: int, dtype: torch.dtype) -> Tensor:
    """U[m, k] = d^(m-k) for m >= k else 0, so (x @ U)_k = sum_{m>=k} d^(m-k) x_m."""
    i = torch.arange(n, dtype=torch.float64)
    e = i[:, None] - i[None, :]
    powers = torch.tensor(d, dtype=torch.float64) ** e.clamp(min=0)
    return torch.where(e >= 0, powers, 0.0).to(dtype)


def grpo_advantages(
    traj_rewards: Tensor, group_ids: Tensor, valid: Tensor, scope: str = "group",
    eps: float = 1e-6,
) -> Tensor:
    """GRPO: A_i = (R_i - mean_group R) / (std R + eps), ``[B]`` (see :func:`group_normalize`)."""
    return group_normalize(traj_rewards, group_ids, valid, scope, eps)


GTPO_SCOPES = ("turn", "group", "global", "batch", "none")
"""How GTPO normalises turn returns; the reasons for the default are in ``GTPOConfig.norm_scope``."""


def gtpo_turn_advantages(
    rewards: Tensor, turn_mask: Tensor, group_ids: Tensor, valid: Tensor, gamma: float = 0.9,
    scope: str = "turn", eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GTPO: discounted turn returns and their normalised advantages, both ``[B, T]``.

    R_ij = sum_{m>=j} gamma^(m-j) r_im over trajectory i's own turns. Advantages normalise R:

    - ``turn``: over the group's returns at the same turn index j (mean and std of R_.j); a turn
      is compared only with the turns its group took at the same point of the episode;
    - ``group``: over all turns of the group's trajectories pooled (one mean and std);
    - ``global``: over all turns of the batch pooled (a third-party reading of the paper);
    - ``batch``/``none``: the group's pooled mean, with the batch's std or no scaling
      (as in :func:`group_normalize`).

    Special cases: one turn per trajectory -> GRPO (``turn``, ``group``: GRPO's ``group`` scope);
    gamma=1 -> R_ij is the undiscounted reward-to-go and R_i1 the summed reward; gamma=0 ->
    R_ij = r_ij. Turn rewards off (the trajectory reward R_i on the final turn) with gamma=1 and
    a pooled scope -> every turn of i carries R_i, so the statistics are GRPO's with each
    trajectory weighted by its turn count; with T turns each, that is GRPO times
    sqrt((nT - 1) / (T(n - 1))), the unbiased std counting nT entries instead of n (exactly GRPO
    for scope none).
    """
    if scope not in GTPO_SCOPES:
        raise ValueError(f"unknown GTPO normalisation scope {scope!r}; known: {GTPO_SCOPES}")
    returns = discounted_cumsum(rewards * turn_mask, gamma) * turn_mask
    entries = turn_mask & valid[:, None]
    T = rewards.shape[1]
    segments = group_ids[:, None].expand_as(rewards)
    if scope == "turn":
        _, compact = torch.unique(group_ids, return_inverse=True)
        segments = compact[:, None] * T + torch.arange(T)
        scope = "group"
    elif scope == "global":
        segments = torch.zeros_like(segments)
        scope = "group"
    adv = group_normalize(returns.flatten(), segments.flatten(), entries.flatten(), scope, eps)
    return returns, adv.view_as(rewards)


def rewards_on_last_tokens(turn_rewards: Tensor, turn_index: Tensor, mask: Tensor) -> Tensor:
    """``[B, L]`` token rewards: each turn's reward on its last token inside ``mask`` (a turn with
    no token inside the mask has nowhere to put its reward; rollouts never produce one)."""
    inside = mask & (turn_index >= 0)
    nxt_index = torch.nn.functional.pad(turn_index[:, 1:], (0, 1), value=-1)
    nxt_inside = torch.nn.functional.pad(inside[:, 1:], (0, 1), value=False)
    last = inside & ~(nxt_inside & (nxt_index == turn_index))
    return torch.where(last, turn_to_tokens(turn_rewards, turn_index), 0.0)


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the tokens where ``mask`` is True.

    The masked tokens of a row are the steps of one episode, in order: tool-output and prompt
    tokens between two turns are part of the environment's transition, not steps, so the last
    token of turn j bootstraps from the value of the first token of turn j+1. The step after the
    last generated token is terminal (value 0): an episode that hit max_turns is not bootstrapped
    either, since nothing follows it in the task. Returns (advantages, returns), both ``[B, L]``
    and 0 off the mask; returns = advantages + values are the value-loss targets.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    B, L = mask.shape
    steps = mask.sum(1)
    width = int(steps.max()) if B else 0
    packed = torch.arange(width) < steps[:, None]  # the same tokens, packed to the left
    src = mask.flatten().nonzero().squeeze(1)
    dst = packed.flatten().nonzero().squeeze(1)

    def pack(x: Tensor) -> Tensor:
        out = torch.zeros(B * width, dtype=dtype)
        return out.index_copy_(0, dst, x.flatten().index_select(0, src).to(dtype)).view(B, width)

    def unpack(x: Tensor) -> Tensor:
        out = torch.zeros(B * L, dtype=dtype)
        return out.index_copy_(0, src, x.flatten().index_select(0, dst)).view(B, L)

    v, r = pack(values), pack(token_rewards)
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))  # 0 past the last step: terminal
    adv = discounted_cumsum(r + gamma * v_next - v, gamma * lam)
    return unpack(adv), unpack(adv + v)


def gae_reference(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``gae`` as CleanRL's loop over each row's masked tokens, last to first: its readable
    definition."""
    advantages = torch.zeros_like(values, dtype=torch.float64)
    for b in range(mask.shape[0]):
        steps = mask[b].nonzero().squeeze(1).tolist()
        last = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_value = float(values[b, steps[k + 1]]) if k + 1 < len(steps) else 0.0
            delta = float(token_rewards[b, t]) + gamma * next_value - float(values[b, t])
            last = delta + gamma * lam * last
            advantages[b, t] = last
    returns = torch.where(mask, advantages + values.double(), 0.0)
    return advantages, returns


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries; 0 off the mask."""
    n = mask.sum()
    if n < 2:
        return torch.zeros_like(x)
    mean = torch.where(mask, x, 0.0).sum() / n
    centered = torch.where(mask, x - mean, 0.0)
    return centered / ((centered**2).sum() / (n - 1)).sqrt().add(eps)


# --------------------------------------------------------------------------- registered


@register_advantage("grpo", reads=("norm_scope",),
                    check=_scope_check(("group", "batch", "none")))
def grpo(batch: RolloutBatch, cfg: AlgoConfig, values: Tensor | None = None) -> Advantages:
    """GRPO: the trajectory reward's group-normalised advantage on every generated token."""
    traj = trajectory_reward(batch.rewards, batch.turn_mask, cfg.trajectory_reward,
                             batch.accuracy, batch.format)
    adv = grpo_advantages(traj, batch.group_ids, batch.valid, cfg.norm_scope, cfg.adv_eps)
    turns = torch.where(batch.turn_mask, adv[:, None], 0.0)
    return Advantages(tokens=turn_to_tokens(turns, batch.turn_index), turns=turns)


@register_advantage("gtpo", reads=("norm_scope", "gamma"), check=_scope_check(GTPO_SCOPES))
def gtpo(batch: RolloutBatch, cfg: AlgoConfig, values: Tensor | None = None) -> Advantages:
    """GTPO: normalised discounted turn returns; turn j's advantage on turn j's tokens."""
    rewards = turn_level_rewards(batch, cfg.turn_rewards, cfg.trajectory_reward)
    _, turns = gtpo_turn_advantages(rewards, batch.turn_mask, batch.group_ids, batch.valid,
                                    cfg.gamma, cfg.norm_scope, cfg.adv_eps)
    return Advantages(tokens=turn_to_tokens(turns, batch.turn_index), turns=turns)


@register_advantage("gae", reads=("gamma", "lam", "whiten_advantages"))
def gae_estimator(batch: RolloutBatch, cfg: AlgoConfig, values: Tensor | None = None) -> Advantages:
    """PPO: token-level GAE with the critic's values; turn rewards on each turn's last token."""
    if values is None:
        raise ValueError("the gae estimator needs the critic's token values [B, L]")
    rewards = turn_level_rewards(batch, cfg.turn_rewards, cfg.trajectory_reward)
    token_rewards = rewards_on_last_tokens(rewards, batch.turn_index, batch.loss_mask)
    adv, ret = gae(token_rewards, values, batch.loss_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, batch.loss_mask)
    return Advantages(tokens=adv, returns=ret)
