"""Policy and value losses as pure functions over ``[B, L]`` token tensors (see ``algos.batch``).

Every function takes the loss mask and touches nothing off it: masked positions are replaced by
0 before any arithmetic, so a prompt or tool-output token's logprob (even -inf or NaN) changes
neither the loss nor its gradient. Each returns the loss beside detached metrics, so a trainer
logs what the update did without recomputing it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LossOutput",
    "aggregate",
    "entropy_from_logits",
    "kl_penalty",
    "policy_loss",
    "value_loss",
]


class LossOutput(NamedTuple):
    loss: Tensor
    """The scalar to call ``backward`` on."""
    metrics: dict[str, Tensor]
    """Detached scalars, token means over the mask: what the update did."""


def aggregation_total(mask: Tensor, mode: str) -> Tensor:
    """What ``aggregate`` counts in ``mode``: the masked tokens (token_mean), the sequences with
    any masked token (seq_mean) or the rows (constant); 0 for an empty mask. Totals of parts of
    a minibatch (micro-batches, ranks) add up to the minibatch's."""
    if mode == "token_mean":
        return mask.sum()
    if mode == "seq_mean":
        return (mask.sum(1) > 0).sum()
    if mode == "constant":
        return torch.tensor(mask.shape[0])
    raise ValueError(f"unknown loss aggregation {mode!r}")


def aggregation_count(mask: Tensor, mode: str) -> Tensor:
    """What ``aggregate`` divides by in ``mode`` (before ``constant``): :func:`aggregation_total`,
    at least 1. A minibatch split into micro-batches passes its own count as ``denominator``."""
    return aggregation_total(mask, mode).clamp(min=1)


def aggregate(
    x: Tensor, mask: Tensor, mode: str = "token_mean", *, constant: float | None = None,
    denominator: float | None = None,
) -> Tensor:
    """Reduce token values ``x [B, L]`` over ``mask`` to a scalar.

    - ``token_mean``: sum / number of tokens. Every token weighs the same (DAPO).
    - ``seq_mean``: the mean of each sequence's token mean (GRPO paper); empty rows are skipped.
    - ``constant``: sum / (B * constant), ``constant`` defaulting to L (Dr.GRPO: a fixed
      normaliser, so neither long nor short answers are favoured).

    ``denominator`` replaces the count in the divisor (tokens, sequences or B) when a minibatch is
    split into micro-batches: pass the whole minibatch's count and sum the micro-batch losses.
    """
    count = aggregation_count(mask, mode) if denominator is None else denominator
    x = torch.where(mask, x, 0.0)
    if mode == "seq_mean":
        return (x.sum(1) / mask.sum(1).clamp(min=1)).sum() / count
    if mode == "constant":
        return x.sum() / (count * (mask.shape[1] if constant is None else constant))
    return x.sum() / count


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1 and k3).

    k1 = log pi - log pi_ref (unbiased, noisy, can be negative); k3 = r - log r - 1 with
    r = pi_ref / pi (unbiased, >= 0, lower variance; GRPO's choice). log r is clamped to
    [-20, 20] so one wild token cannot overflow.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        return torch.exp(log_r) - log_r - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis, ``[..., V] -> [...]``, in at least float32.
    Logits of -inf (masked vocabulary) contribute 0, not NaN."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)).detach()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    constant: float | None = None,
    denominator: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> LossOutput:
    """PPO-clip surrogate, plus an optional KL penalty to a reference and an entropy bonus.

    Per token, with ratio = exp(logprobs - old_logprobs):
    ``max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``; aggregated by
    :func:`aggregate`. ``loss = pg + kl_coef * kl - entropy_coef * entropy`` with each term
    aggregated the same way. ``old_logprobs`` are those of the sampling policy (detached).

    Metrics: ``pg_loss``; ``clip_frac``, the share of tokens whose clipped term was taken (no
    gradient through them); ``approx_kl``, the k3 estimate of KL(pi_old || pi); ``ratio``;
    ``kl`` and ``entropy`` when given.
    """
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    adv = torch.where(mask, advantages, 0.0)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)

    def agg(x: Tensor) -> Tensor:
        return aggregate(x, mask, aggregation, constant=constant, denominator=denominator)

    pg_loss = agg(pg)
    loss = pg_loss
    with torch.no_grad():
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": _token_mean((pg_clipped > pg_unclipped).float(), mask),
            "approx_kl": _token_mean(ratio - 1.0 - log_ratio, mask),
            "ratio": _token_mean(ratio, mask),
        }
    if ref_logprobs is not None:
        kl = kl_penalty(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0),
                        kl_estimator)
        if kl_coef:
            loss = loss + kl_coef * agg(kl)
        metrics["kl"] = _token_mean(kl, mask)
    if entropy is not None:
        ent = torch.where(mask, entropy, 0.0)
        if entropy_coef:
            loss = loss - entropy_coef * agg(ent)
        metrics["entropy"] = _token_mean(ent, mask)
    return LossOutput(loss, metrics)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float = 0.2,
    aggregation: str = "token_mean",
    constant: float | None = None,
    denominator: float | None = None,
) -> LossOutput:
    """Clipped value loss: ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = V_old + clip(V - V_old, -clip, clip)``, so the critic moves at most ``clip`` per
    batch where moving further would lower its loss (PPO2, CleanRL). Metrics: ``vf_loss``,
    ``vf_clip_frac``."""
    v = torch.where(mask, values, 0.0)
    old = torch.where(mask, old_values, 0.0)
    ret = torch.where(mask, returns, 0.0)
    v_clipped = old + (v - old).clamp(-clip, clip)
    unclipped = (v - ret) ** 2
    clipped = (v_clipped - ret) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), mask, aggregation,
                           constant=constant, denominator=denominator)
    metrics = {
        "vf_loss": loss.detach(),
        "vf_clip_frac": _token_mean((clipped > unclipped).float(), mask),
    }
    return LossOutput(loss, metrics)
