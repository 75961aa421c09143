"""Losses: hand-computed tables, masking, and gradients against finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algos.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss, value_loss

t = torch.tensor
approx = pytest.approx
ln = math.log

# Two sequences, four positions; row 0 has three loss tokens, row 1 one.
#   row 0: ratios 1.5, 0.5, 1.1 with advantages 1, -1, -2 (position 3 is masked junk)
#   row 1: ratio 1 with advantage 0.5
MASK = t([[True, True, True, False], [True, False, False, False]])
OLD = torch.zeros(2, 4)
LOGP = t([[ln(1.5), ln(0.5), ln(1.1), 3.0], [0.0, 7.0, -7.0, 0.0]])
ADV = t([[1.0, -1.0, -2.0, 5.0], [0.5, 9.0, 9.0, 9.0]])
# Per-token surrogate max(-A r, -A clip(r, 0.8, 1.28)) with clip_low 0.2, clip_high 0.28:
#   r=1.5, A=1:  max(-1.5, -1.28) = -1.28   (clipped)
#   r=0.5, A=-1: max(0.5, 0.8)    = 0.8     (clipped)
#   r=1.1, A=-2: max(2.2, 2.2)    = 2.2     (inside the range: not clipped)
#   r=1.0, A=.5: -0.5
# Sums: row 0 = 1.72 over 3 tokens, row 1 = -0.5 over 1 token, total 1.22 over 4 tokens.
CLIP = dict(clip_low=0.2, clip_high=0.28)


@pytest.mark.parametrize("aggregation, constant, expected", [
    ("token_mean", None, 1.22 / 4),                     # 0.305
    ("seq_mean", None, (1.72 / 3 - 0.5 / 1) / 2),       # 0.036667
    ("constant", None, 1.22 / (2 * 4)),                 # L = 4 by default: 0.1525
    ("constant", 10, 1.22 / (2 * 10)),                  # Dr.GRPO with a fixed budget: 0.061
])
def test_policy_loss_aggregations(aggregation, constant, expected):
    out = policy_loss(LOGP, OLD, ADV, MASK, aggregation=aggregation, constant=constant, **CLIP)
    assert out.loss.item() == approx(expected, abs=1e-6)


def test_policy_loss_metrics():
    out = policy_loss(LOGP, OLD, ADV, MASK, **CLIP)
    m = out.metrics
    assert m["clip_frac"].item() == approx(2 / 4)      # 2 of the 4 loss tokens were clipped
    # approx KL(old || new), k3 = r - 1 - ln r per token: 0.094535, 0.193147, 0.004690, 0
    assert m["approx_kl"].item() == approx((0.094535 + 0.193147 + 0.004690) / 4, abs=1e-5)
    assert m["ratio"].item() == approx((1.5 + 0.5 + 1.1 + 1.0) / 4, abs=1e-6)
    assert "kl" not in m and "entropy" not in m


def test_denominator_override_sums_micro_batches_to_the_minibatch_loss():
    whole = policy_loss(LOGP, OLD, ADV, MASK, **CLIP).loss
    parts = [policy_loss(LOGP[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1],
                         denominator=4, **CLIP).loss for i in range(2)]
    assert (parts[0] + parts[1]).item() == approx(whole.item(), abs=1e-6)
    seq = [aggregate(LOGP[i:i + 1], MASK[i:i + 1], "seq_mean", denominator=2) for i in range(2)]
    assert (seq[0] + seq[1]).item() == approx(aggregate(LOGP, MASK, "seq_mean").item(), abs=1e-6)


def test_kl_estimators_and_penalty():
    # pi = 0.5, pi_ref = 0.25: k1 = ln 0.5 - ln 0.25 = ln 2 = 0.693147;
    # k3 with r = pi_ref / pi = 0.5: r - ln r - 1 = 0.5 + 0.693147 - 1 = 0.193147.
    logp, ref = t([ln(0.5)]), t([ln(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == approx(0.693147, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == approx(0.193147, abs=1e-6)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")
    # In the loss: token_mean pg 0.305 plus 0.1 * mean k3 over the 4 loss tokens. With
    # ref = logp - ln 2 on every token, each k3 = 0.5 - ln 0.5 - 1 = 0.193147 -> +0.0193147.
    ref_lp = LOGP - ln(2)
    out = policy_loss(LOGP, OLD, ADV, MASK, ref_logprobs=ref_lp, kl_coef=0.1, **CLIP)
    assert out.loss.item() == approx(0.305 + 0.0193147, abs=1e-6)
    assert out.metrics["kl"].item() == approx(0.193147, abs=1e-6)


def test_entropy_bonus_and_entropy_from_logits():
    # Uniform over 4 -> ln 4 = 1.386294; one certain token (others -inf) -> 0, not NaN.
    logits = t([[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf]])
    ent = entropy_from_logits(logits)
    assert ent.tolist() == approx([ln(4), 0.0], abs=1e-6)
    entropy = torch.full((2, 4), 2.0)
    out = policy_loss(LOGP, OLD, ADV, MASK, entropy=entropy, entropy_coef=0.01, **CLIP)
    assert out.loss.item() == approx(0.305 - 0.01 * 2.0, abs=1e-6)  # 0.285
    assert out.metrics["entropy"].item() == approx(2.0)


def test_value_loss_table():
    # V = [1.0, 0.0, 0.55], V_old = [0.5, 0.5, 0.5], R = [2.0, 0.1, 0.6], clip 0.2:
    #   t0: V_clip = 0.5 + 0.2 = 0.7;  max((1-2)^2, (0.7-2)^2)   = max(1, 1.69)      = 1.69
    #   t1: V_clip = 0.5 - 0.2 = 0.3;  max((0-0.1)^2, (0.3-0.1)^2) = max(0.01, 0.04) = 0.04
    #   t2: V_clip = 0.55 (inside);    (0.55-0.6)^2 = 0.0025 both -> not clipped
    # loss = 0.5 * (1.69 + 0.04 + 0.0025) / 3 = 0.28875; clip fraction 2/3.
    v, old, ret = t([[1.0, 0.0, 0.55, 9.0]]), t([[0.5, 0.5, 0.5, -9.0]]), t([[2.0, 0.1, 0.6, 0.0]])
    mask = t([[True, True, True, False]])
    out = value_loss(v, old, ret, mask, clip=0.2)
    assert out.loss.item() == approx(0.28875, abs=1e-6)
    assert out.metrics["vf_clip_frac"].item() == approx(2 / 3)
    assert value_loss(v, old, ret, mask, clip=math.inf).loss.item() == \
        approx(0.5 * (1 + 0.01 + 0.0025) / 3, abs=1e-6)


def test_empty_mask_gives_zero_not_nan():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    x = torch.randn(2, 3)
    for mode in ("token_mean", "seq_mean", "constant"):
        assert aggregate(x, mask, mode).item() == 0.0
    out = policy_loss(x, x, x, mask)
    assert out.loss.item() == 0.0 and all(torch.isfinite(v) for v in out.metrics.values())


def _random_case(seed: int, dtype=torch.float32, B=3, L=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[0, 0] = True
    logp = (torch.randn(B, L, generator=g, dtype=dtype) * 0.3 - 1.0)
    old = logp + torch.randn(B, L, generator=g, dtype=dtype) * 0.3
    ref = logp + torch.randn(B, L, generator=g, dtype=dtype) * 0.3
    adv = torch.randn(B, L, generator=g, dtype=dtype)
    ent = torch.rand(B, L, generator=g, dtype=dtype)
    return mask, logp, old, ref, adv, ent


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["token_mean", "seq_mean", "constant"]),
       st.sampled_from([math.inf, -math.inf, math.nan, 1e6]))
def test_masked_tokens_change_nothing(seed, aggregation, junk):
    mask, logp, old, ref, adv, ent = _random_case(seed)
    kw = dict(aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01, clip_high=0.28)

    def run(lp, o, r, a, e):
        lp = lp.clone().requires_grad_(True)
        out = policy_loss(lp, o, a, mask, ref_logprobs=r, entropy=e, **kw)
        out.loss.backward()
        return out, lp.grad

    base, grad = run(logp, old, ref, adv, ent)
    junked = [torch.where(mask, x, junk) for x in (logp, old, ref, adv, ent)]
    out, grad2 = run(*junked)
    assert out.loss.item() == approx(base.loss.item(), rel=1e-6, abs=1e-7)
    for k in base.metrics:
        assert out.metrics[k].item() == approx(base.metrics[k].item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad2, grad)
    assert (grad[~mask] == 0).all()
    v = value_loss(torch.where(mask, adv, junk), torch.where(mask, old, junk),
                   torch.where(mask, ref, junk), mask)
    assert v.loss.item() == approx(value_loss(adv, old, ref, mask).loss.item(), rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["token_mean", "seq_mean", "constant"]),
       st.sampled_from(["k1", "k3"]))
def test_gradients_match_finite_differences(seed, aggregation, kl_estimator):
    mask, logp, old, ref, adv, ent = _random_case(seed, torch.float64, B=2, L=4)

    def policy(lp, e):
        return policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                           aggregation=aggregation, ref_logprobs=ref, kl_coef=0.1,
                           kl_estimator=kl_estimator, entropy=e, entropy_coef=0.01).loss

    assert torch.autograd.gradcheck(policy, (logp.requires_grad_(), ent.requires_grad_()))

    def value(v):
        return value_loss(v, old, ref, mask, clip=0.2, aggregation=aggregation).loss

    assert torch.autograd.gradcheck(value, (adv.clone().requires_grad_(),))

    def entropy(logits):
        return entropy_from_logits(logits)

    logits = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert torch.autograd.gradcheck(lambda x: entropy(x).double(), (logits.requires_grad_(),))
