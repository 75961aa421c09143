"""Advantage estimators: hand-computed tables, special cases, and properties (hypothesis).

Every expected number is derived in the comment above it. Std is unbiased (n - 1) throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algos.advantages import (
    ADVANTAGES,
    GTPO_SCOPES,
    Advantages,
    discounted_cumsum,
    discounted_cumsum_reference,
    gae,
    gae_reference,
    get_advantage,
    group_normalize,
    group_normalize_reference,
    grpo_advantages,
    gtpo_turn_advantages,
    register_advantage,
    rewards_on_last_tokens,
    trajectory_reward,
)
from algos.batch import RolloutBatch, put_on_final_turn, turn_to_tokens
from algos.config import GRPOConfig, GTPOConfig, PPOConfig

t = torch.tensor
approx = pytest.approx


def close(actual: torch.Tensor, expected: list, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), t(expected, dtype=torch.float64),
                               atol=tol, rtol=0)


# --------------------------------------------------------------------------- GRPO tables


# Group 0: rewards [1, 0, 0, 1] -> mean 0.5, deviations +-0.5, var = 4 * 0.25 / 3 = 1/3,
#   std = 0.57735, A = +-0.5 / 0.57735 = +-0.866025.
# Group 1: rewards [1, 1, 1] -> every rollout equal: A = 0 (no 0/0).
# Group 2: valid rewards [2, 0] (the third, reward 5, is an infra error and ignored):
#   mean 1, std = sqrt(2) = 1.414214, A = +-0.707107; the infra error gets 0.
GROUPS = t([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
REWARDS = t([1.0, 0, 0, 1, 1, 1, 1, 2, 0, 5])
VALID = t([True] * 9 + [False])


def test_grpo_group_scale():
    adv = grpo_advantages(REWARDS, GROUPS, VALID, "group")
    r = 0.866025
    close(adv, [r, -r, -r, r, 0, 0, 0, 0.707107, -0.707107, 0])


def test_grpo_batch_scale_lite_ppo():
    # Group mean, batch std over the 9 valid rewards [1,0,0,1,1,1,1,2,0]: mean 7/9,
    # sum of squared deviations 5*(2/9)^2 + 3*(7/9)^2 + (11/9)^2 = 32/9, var = 32/9/8 = 4/9,
    # std = 2/3. A = (R - group mean) / (2/3): group 0 +-0.75, group 1 0, group 2 +-1.5.
    adv = grpo_advantages(REWARDS, GROUPS, VALID, "batch")
    close(adv, [0.75, -0.75, -0.75, 0.75, 0, 0, 0, 1.5, -1.5, 0])


def test_grpo_no_scale_dr_grpo():
    # Only the group mean is subtracted: group 0 +-0.5, group 2 +-1.
    adv = grpo_advantages(REWARDS, GROUPS, VALID, "none")
    close(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 1, -1, 0])


def test_zero_variance_and_singletons_give_zero_not_nan():
    adv = grpo_advantages(t([0.3, 0.3, 0.3, 7.0]), t([0, 0, 0, 1]), t([True] * 4), "group")
    close(adv, [0, 0, 0, 0])
    assert group_normalize(t([1.0]), t([0]), t([False])).tolist() == [0.0]


def test_trajectory_reward_modes():
    # Turn components of four two-turn trajectories:
    #   (acc 1, fmt 0)              -> sum 1,    min_acc_format 1 (clean: accuracy), penalty 1
    #   (acc 1, fmt -0.1 on turn 0) -> sum 0.9,  min_acc_format 0 (binary format term fails),
    #                                  min_acc_penalty -0.1
    #   (acc 0, fmt 0)              -> 0, 0, 0
    #   (acc 0, fmt -0.1 and -0.1)  -> sum -0.2, min_acc_format 0, min_acc_penalty -0.2
    acc = t([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    fmt = t([[0.0, 0.0], [-0.1, 0.0], [0.0, 0.0], [-0.1, -0.1]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    close(trajectory_reward(acc + fmt, mask, "sum"), [1.0, 0.9, 0.0, -0.2])
    close(trajectory_reward(acc + fmt, mask, "min_acc_format", acc, fmt), [1.0, 0.0, 0.0, 0.0])
    close(trajectory_reward(acc + fmt, mask, "min_acc_penalty", acc, fmt),
          [1.0, -0.1, 0.0, -0.2])
    with pytest.raises(ValueError, match="components"):
        trajectory_reward(acc, mask, "min_acc_format")


# --------------------------------------------------------------------------- GTPO tables

# One group of two trajectories, gamma = 0.9:
#   traj 0, rewards [-0.1, 0, 1]: R = [-0.1 + 0.9*0 + 0.81*1, 0 + 0.9*1, 1] = [0.71, 0.9, 1.0]
#   traj 1, rewards [0, 0]:       R = [0, 0]
GT_REWARDS = t([[-0.1, 0.0, 1.0], [0.0, 0.0, 0.0]])
GT_MASK = t([[True, True, True], [True, True, False]])
GT_GROUPS = t([7, 7])
BOTH = t([True, True])


def test_gtpo_returns_and_group_advantages():
    # Over all 5 turns of the group: mean 2.61/5 = 0.522, squared deviations sum to 0.95168,
    # var = 0.95168/4 = 0.23792, std = 0.487770; A = (R - 0.522)/0.487770.
    returns, adv = gtpo_turn_advantages(GT_REWARDS, GT_MASK, GT_GROUPS, BOTH, 0.9, "group")
    close(returns, [[0.71, 0.9, 1.0], [0.0, 0.0, 0.0]])
    close(adv, [[0.385427, 0.774955, 0.979969], [-1.070176, -1.070176, 0.0]])


def test_gtpo_turn_scope():
    # Per turn index: turn 0 [0.71, 0] -> +-0.707107; turn 1 [0.9, 0] -> +-0.707107;
    # turn 2 has one trajectory only -> no spread -> 0.
    _, adv = gtpo_turn_advantages(GT_REWARDS, GT_MASK, GT_GROUPS, BOTH, 0.9, "turn")
    s = 0.707107
    close(adv, [[s, s, 0.0], [-s, -s, 0.0]])


def test_gtpo_gamma_special_cases():
    # gamma = 1: the undiscounted reward-to-go; R_i0 is the summed reward 0.9.
    ret1, _ = gtpo_turn_advantages(GT_REWARDS, GT_MASK, GT_GROUPS, BOTH, 1.0)
    close(ret1, [[0.9, 1.0, 1.0], [0.0, 0.0, 0.0]])
    # gamma = 0: each turn's own reward.
    ret0, _ = gtpo_turn_advantages(GT_REWARDS, GT_MASK, GT_GROUPS, BOTH, 0.0)
    close(ret0, [[-0.1, 0.0, 1.0], [0.0, 0.0, 0.0]])


def _batch(rewards, mask, groups, valid=None, acc=None, fmt=None) -> RolloutBatch:
    """Records from padded tensors: 2 prompt tokens, then per turn 2 generated tokens and 1
    tool-output token."""

    def cut(x):
        if x is None:
            return None
        return [[float(v) for v, m in zip(r, mr, strict=True) if m]
                for r, mr in zip(x, mask, strict=True)]

    rows = cut(rewards)
    spans = [[(2 + 3 * j, 4 + 3 * j) for j in range(len(r))] for r in rows]
    return RolloutBatch.build(
        [int(g) for g in groups], rows, spans,
        infra_error=None if valid is None else [not bool(v) for v in valid],
        turn_accuracy=cut(acc), turn_format=cut(fmt),
    )


def test_gtpo_turn_rewards_off_gamma_one_special_case():
    # Turn rewards off + gamma = 1: every turn of trajectory i carries its trajectory reward
    # R_i (here 0.9 and 0), so the group's statistics weigh trajectories by turn count:
    # entries [0.9, 0.9, 0.9, 0, 0], mean 0.54, std 0.492950 -> 0.730297 and -1.095445,
    # whereas GRPO on [0.9, 0] gives +-0.707107. With equal turn counts they agree
    # (property test below). The default turn scope compares turn j with turn j only: turns 0
    # and 1 see [0.9, 0] -> +-0.707107, GRPO's numbers; turn 2 has no peer -> 0.
    batch = _batch(GT_REWARDS, GT_MASK, GT_GROUPS)
    cfg = GTPOConfig(turn_rewards=False, gamma=1.0, shaping=False, norm_scope="group")
    out = get_advantage("gtpo")(batch, cfg)
    close(out.turns, [[0.730297, 0.730297, 0.730297], [-1.095445, -1.095445, 0.0]])
    grpo = get_advantage("grpo")(batch, GRPOConfig())
    close(grpo.turns, [[0.707107] * 3, [-0.707107, -0.707107, 0.0]])
    per_turn = get_advantage("gtpo")(batch, GTPOConfig(turn_rewards=False, gamma=1.0))
    close(per_turn.turns, [[0.707107, 0.707107, 0.0], [-0.707107, -0.707107, 0.0]])


def test_turn_advantages_reach_exactly_their_tokens():
    batch = _batch(GT_REWARDS, GT_MASK, GT_GROUPS)
    out = get_advantage("gtpo")(batch, GTPOConfig())
    # Row 0: prompt 0-1, turn 0 at 2-3, tool output 4, turn 1 at 5-6, output 7, turn 2 at 8-9.
    a = out.turns[0]
    expected = [0, 0, a[0], a[0], 0, a[1], a[1], 0, a[2], a[2]]
    close(out.tokens[0], [float(x) for x in expected])
    assert (out.tokens[~batch.loss_mask] == 0).all()


def test_infra_error_gets_zero_and_is_ignored():
    rewards = t([[1.0], [0.0], [100.0]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    batch = _batch(rewards, mask, [0, 0, 0], valid=[True, True, False])
    for name, cfg in [("grpo", GRPOConfig()), ("gtpo", GTPOConfig())]:
        out = get_advantage(name)(batch, cfg)
        close(out.turns[:, 0], [0.707107, -0.707107, 0.0])
        assert not batch.loss_mask[2].any()


# --------------------------------------------------------------------------- GAE tables


def test_gae_table_skips_tool_output():
    # Tokens: [prompt, g0, g0, tool-out, g1, pad]; turn rewards [0.5, 1.0] land on the last
    # token of each turn (positions 2 and 4). Values on generated tokens: 0.1, 0.2, 0.4.
    # Steps (generated tokens only): s0 r=0 v=.1, s1 r=.5 v=.2, s2 r=1 v=.4, then terminal.
    # gamma = 0.9, lambda = 0.5, c = 0.45:
    #   d2 = 1 + 0 - .4 = .6;  d1 = .5 + .9*.4 - .2 = .66;  d0 = 0 + .9*.2 - .1 = .08
    #   A2 = .6;  A1 = .66 + .45*.6 = .93;  A0 = .08 + .45*.93 = .4985
    #   returns = A + V = .5985, 1.13, 1.0
    batch = RolloutBatch.build([0], [[0.5, 1.0]], [[(1, 3), (4, 5)]], seq_len=6)
    values = t([[9.0, 0.1, 0.2, 9.0, 0.4, 9.0]])  # 9 = junk off the mask, must not matter
    rewards = rewards_on_last_tokens(batch.rewards, batch.turn_index, batch.loss_mask)
    close(rewards, [[0, 0, 0.5, 0, 1.0, 0]])
    adv, ret = gae(rewards, values, batch.loss_mask, gamma=0.9, lam=0.5)
    close(adv, [[0, 0.4985, 0.93, 0, 0.6, 0]])
    close(ret, [[0, 0.5985, 1.13, 0, 1.0, 0]])


def test_gae_gamma_lambda_one_is_monte_carlo():
    # gamma = lambda = 1: A_t = (sum of later rewards) - V_t; returns = the summed future reward.
    batch = RolloutBatch.build([0], [[0.5, 1.0]], [[(1, 3), (4, 5)]], seq_len=6)
    values = t([[0.0, 0.1, 0.2, 0.0, 0.4, 0.0]])
    rewards = rewards_on_last_tokens(batch.rewards, batch.turn_index, batch.loss_mask)
    adv, ret = gae(rewards, values, batch.loss_mask, 1.0, 1.0)
    close(ret, [[0, 1.5, 1.5, 0, 1.0, 0]])
    close(adv, [[0, 1.4, 1.3, 0, 0.6, 0]])


def test_gae_estimator_whitens_and_needs_values():
    batch = _batch(GT_REWARDS, GT_MASK, GT_GROUPS)
    values = torch.linspace(0, 1, batch.loss_mask.numel()).view_as(batch.loss_mask)
    out = get_advantage("gae")(batch, PPOConfig(), values)
    a = out.tokens[batch.loss_mask]
    assert a.mean().item() == approx(0.0, abs=1e-6) and a.std().item() == approx(1.0, abs=1e-5)
    assert (out.tokens[~batch.loss_mask] == 0).all() and out.returns is not None
    raw = get_advantage("gae")(batch, PPOConfig(whiten_advantages=False), values)
    torch.testing.assert_close(raw.returns[batch.loss_mask] - values[batch.loss_mask],
                               raw.tokens[batch.loss_mask])
    with pytest.raises(ValueError, match="values"):
        get_advantage("gae")(batch, PPOConfig())


# --------------------------------------------------------------------------- registry, config


def test_registry_plugs_in_by_name():
    assert {"grpo", "gtpo", "gae"} <= set(ADVANTAGES)
    assert ADVANTAGES["gtpo"].reads == ("norm_scope", "gamma") and ADVANTAGES["gtpo"].check

    @register_advantage("_test_zero", reads=("gamma",))
    def zero(batch, cfg, values=None):
        return Advantages(tokens=torch.zeros(batch.loss_mask.shape))

    try:
        assert get_advantage("_test_zero") is zero
        assert ADVANTAGES["_test_zero"].reads == ("gamma",)
        GTPOConfig(advantage="_test_zero")  # a config with the fields it reads may name it
        with pytest.raises(ValueError, match=r"reads config fields \['gamma'\]"):
            GRPOConfig(advantage="_test_zero")
        # The same function with the same metadata again (a notebook re-running its cell): no-op.
        assert register_advantage("_test_zero", reads=("gamma",))(zero) is zero
        # Anything else under a taken name raises: another function, or other metadata.
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("_test_zero", reads=("gamma",))(lambda batch, cfg, values=None: 0)
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("_test_zero")(zero)
        assert ADVANTAGES["_test_zero"].reads == ("gamma",)
    finally:
        ADVANTAGES.unregister("_test_zero")
    with pytest.raises(KeyError, match="known: .*gtpo"):
        get_advantage("nope")


@pytest.mark.parametrize("kwargs, message", [
    ({"norm_scope": "turn"}, "norm_scope"),
    ({"turn_rewards": True}, "turn_rewards"),
    ({"clip_low": 1.0}, "clip_low"),
    ({"minibatch_size": 10, "grad_accum_steps": 4}, "multiple"),
    ({"minibatch_size": 1000}, "exceeds"),
    ({"loss_aggregation": "sum"}, "loss_aggregation"),
    ({"kl_estimator": "k2"}, "kl_estimator"),
    ({"shaping_alpha": 1.0}, "below a correct"),
    ({"group_size": 1}, "group_size"),
    ({"advantage": "nope"}, "not registered"),
    ({"dtype": "float64"}, "dtype"),
    ({"trajectory_reward": "max"}, "trajectory_reward"),
    ({"lr": 0.0}, "lr"),
])
def test_grpo_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kwargs)


@pytest.mark.parametrize("make, message", [
    (lambda: PPOConfig(advantage="grpo"), r"\['norm_scope'\].*PPOConfig"),
    (lambda: GRPOConfig(advantage="gae"), r"\['gamma', 'lam', 'whiten_advantages'\]"),
    (lambda: GTPOConfig(advantage="grpo"), "norm_scope in"),  # GTPO's default scope: turn
    (lambda: GTPOConfig(norm_scope="trajectory"), "norm_scope in"),
    (lambda: GTPOConfig(zero_variance_groups="resample"), "zero_variance_groups"),
    (lambda: GTPOConfig(lr_warmup_steps=-1), "lr_warmup_steps"),
])
def test_estimator_and_config_mismatch_fails_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_config_defaults_and_ablation_switches():
    gtpo = GTPOConfig()
    assert (gtpo.turn_rewards, gtpo.gamma, gtpo.shaping, gtpo.norm_scope) == \
        (True, 0.9, True, "turn")
    assert gtpo.shaping_alpha == 0.5
    assert GTPOConfig(turn_rewards=False, gamma=1.0, shaping=False, norm_scope="turn")
    with pytest.raises(ValueError, match="gamma"):
        GTPOConfig(gamma=1.5)
    ppo = PPOConfig()
    assert ppo.advantage == "gae" and ppo.group_size == 1
    with pytest.raises(ValueError, match="lam"):
        PPOConfig(lam=-0.1)
    assert GRPOConfig().to_dict()["advantage"] == "grpo"


def test_build_validates_and_lays_out_tokens():
    batch = RolloutBatch.build([3, 3], [[1.0], [0.0, 0.5]], [[(2, 4)], [(1, 2), (3, 5)]],
                               seq_len=6, turn_accuracy=[[1.0], [0.0, 0.0]])
    assert batch.turn_index.tolist() == [[-1, -1, 0, 0, -1, -1], [-1, 0, -1, 1, 1, -1]]
    assert batch.correct.tolist() == [True, False]
    assert put_on_final_turn(t([2.0, 3.0]), batch.turn_mask).tolist() == [[2, 0], [0, 3]]
    assert turn_to_tokens(t([[1.0, 0.0], [4.0, 5.0]]), batch.turn_index)[1].tolist() == \
        [0, 4, 0, 5, 5, 0]
    with pytest.raises(ValueError, match="sorted and disjoint"):
        RolloutBatch.build([0], [[0.0, 0.0]], [[(3, 5), (4, 6)]])
    with pytest.raises(ValueError, match="one span per turn"):
        RolloutBatch.build([0], [[0.0, 0.0]], [[(3, 5)]])
    with pytest.raises(ValueError, match="past seq_len"):
        RolloutBatch.build([0], [[0.0]], [[(3, 9)]], seq_len=5)


# --------------------------------------------------------------------------- properties


@st.composite
def rollouts(draw, max_turns=4, equal_turns=False):
    """A random small batch: groups of 1-5 trajectories with 1-max_turns turns, rewards on a
    coarse grid (so ties and all-equal groups happen), some infra errors."""
    n_groups = draw(st.integers(1, 4))
    groups, rows, valid = [], [], []
    for g in range(n_groups):
        size = draw(st.integers(1, 5))
        turns = draw(st.integers(1, max_turns))
        for _ in range(size):
            k = turns if equal_turns else draw(st.integers(1, max_turns))
            rows.append(draw(st.lists(st.sampled_from([-0.1, 0.0, 0.25, 0.5, 1.0]),
                                      min_size=k, max_size=k)))
            groups.append(g * 10 + 3)
            valid.append(draw(st.booleans()) or draw(st.booleans()))
    T = max(len(r) for r in rows)
    rewards = torch.zeros(len(rows), T)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        rewards[i, :len(r)] = t(r)
        mask[i, :len(r)] = True
    return _batch(rewards, mask, groups, valid=valid)


SCOPES = ["group", "batch", "none"]
CONFIGS = [GRPOConfig(norm_scope=s) for s in SCOPES] + \
          [GTPOConfig(norm_scope=s) for s in GTPO_SCOPES] + [PPOConfig()]


def _permute(batch: RolloutBatch, perm: torch.Tensor) -> RolloutBatch:
    return batch.replace(**{f: getattr(batch, f)[perm] for f in
                            ("group_ids", "rewards", "accuracy", "format", "turn_mask",
                             "infra_error", "correct", "void", "loss_mask", "turn_index")})


@settings(max_examples=40, deadline=None)
@given(rollouts(), st.randoms(use_true_random=False))
def test_reordering_trajectories_permutes_advantages(batch, rnd):
    perm = list(range(batch.group_ids.numel()))
    rnd.shuffle(perm)
    perm = t(perm)
    values = torch.linspace(-1, 1, batch.loss_mask.numel()).view_as(batch.loss_mask)
    for cfg in CONFIGS:
        est = get_advantage(cfg.advantage)
        a = est(batch, cfg, values).tokens
        b = est(_permute(batch, perm), cfg, values[perm]).tokens
        torch.testing.assert_close(b, a[perm], atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(rollouts(), st.floats(0.5, 4.0), st.floats(-2.0, 2.0))
def test_grpo_shift_and_scale(batch, scale, shift):
    traj = trajectory_reward(batch.rewards, batch.turn_mask)
    for scope in SCOPES:
        a = grpo_advantages(traj, batch.group_ids, batch.valid, scope)
        b = grpo_advantages(scale * traj + shift, batch.group_ids, batch.valid, scope)
        # Centered and divided by a std: invariant. Centered only (Dr.GRPO): scales with R.
        expected = a * scale if scope == "none" else a
        torch.testing.assert_close(b, expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(rollouts(), st.floats(0.5, 4.0), st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_gtpo_scale(batch, scale, gamma):
    for scope in GTPO_SCOPES:
        _, a = gtpo_turn_advantages(batch.rewards, batch.turn_mask, batch.group_ids,
                                    batch.valid, gamma, scope)
        _, b = gtpo_turn_advantages(scale * batch.rewards, batch.turn_mask, batch.group_ids,
                                    batch.valid, gamma, scope)
        torch.testing.assert_close(b, a * scale if scope == "none" else a, atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(rollouts(max_turns=1), st.sampled_from(SCOPES + ["turn"]), st.booleans())
def test_gtpo_one_turn_gamma_one_equals_grpo(batch, scope, turn_rewards):
    gtpo = get_advantage("gtpo")(batch, GTPOConfig(gamma=1.0, norm_scope=scope,
                                                   turn_rewards=turn_rewards))
    grpo_scope = "group" if scope == "turn" else scope  # one turn: turn index 0 is the group
    grpo = get_advantage("grpo")(batch, GRPOConfig(norm_scope=grpo_scope))
    torch.testing.assert_close(gtpo.tokens, grpo.tokens, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(rollouts(max_turns=4, equal_turns=True), st.sampled_from(SCOPES))
def test_gtpo_turn_rewards_off_gamma_one_equal_turns_is_scaled_grpo(batch, scope):
    # Each of the T turns of trajectory i carries R_i, so every deviation from the group mean
    # is GRPO's, repeated T times. Only the unbiased std sees n*T entries instead of n:
    # GTPO = GRPO * sqrt((n*T - 1) / (T * (n - 1))), with n the valid trajectories of the set
    # the std runs over (the group, or the batch), and exactly GRPO for scope none.
    gtpo = get_advantage("gtpo")(batch, GTPOConfig(gamma=1.0, norm_scope=scope,
                                                   turn_rewards=False))
    grpo = get_advantage("grpo")(batch, GRPOConfig(norm_scope=scope))
    turns = batch.turn_mask.sum(1).double()
    valid = batch.valid.double()
    if scope == "group":
        _, g = torch.unique(batch.group_ids, return_inverse=True)
        n = torch.zeros(int(g.max()) + 1, dtype=torch.float64).index_add_(0, g, valid)[g]
    else:
        n = valid.sum().expand_as(valid)
    factor = torch.sqrt((n * turns - 1) / (turns * (n - 1)).clamp(min=1e-12))
    factor = torch.where((n < 2) | (scope == "none"), 1.0, factor)  # no spread -> 0 anyway
    if scope == "batch" and turns[batch.valid].unique().numel() > 1:
        return  # the batch std mixes groups with different turn counts: no closed form
    expected = grpo.tokens.double() * factor[:, None]
    torch.testing.assert_close(gtpo.tokens.double(), expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.floats(0.0, 1.0), st.integers(1, 70), st.integers(0, 2**31))
def test_discounted_cumsum_matches_loop(n, d, block, seed):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(discounted_cumsum(x, d, block), discounted_cumsum_reference(x, d))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_matches_reference_loop(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, L = 4, 23
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[0] = False  # a row without generated tokens
    rewards = torch.randn(B, L, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, L, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-9, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-9, rtol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(["group", "batch", "none"]), st.booleans())
def test_group_normalize_matches_reference_loop(seed, scope, ties):
    g = torch.Generator().manual_seed(seed)
    n = 24
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if ties:  # binary rewards: many flat segments
        x = (x > 0).double()
    segments = torch.randint(0, 6, (n,), generator=g) * 7  # any integer ids
    valid = torch.rand(n, generator=g) < 0.8
    torch.testing.assert_close(group_normalize(x, segments, valid, scope),
                               group_normalize_reference(x, segments, valid, scope))


def test_scales_to_the_benchmark_shape():
    # 4,096 trajectories x 8 turns x 512 tokens: no Python loop over tokens or groups.
    B, T, L = 4096, 8, 512
    g = torch.Generator().manual_seed(0)
    turn_mask = torch.ones(B, T, dtype=torch.bool)
    turn_index = (torch.arange(L) // (L // T)).expand(B, L).clone()
    turn_index[:, ::7] = -1
    batch = RolloutBatch(
        group_ids=torch.arange(B) // 8, rewards=torch.rand(B, T, generator=g),
        accuracy=torch.zeros(B, T), format=torch.zeros(B, T), turn_mask=turn_mask,
        infra_error=torch.zeros(B, dtype=torch.bool), correct=torch.zeros(B, dtype=torch.bool),
        void=torch.zeros(B, dtype=torch.bool), loss_mask=turn_index >= 0, turn_index=turn_index)
    for cfg in (GRPOConfig(), GTPOConfig(), PPOConfig()):
        out = get_advantage(cfg.advantage)(batch, cfg, torch.rand(B, L, generator=g))
        assert out.tokens.shape == (B, L) and torch.isfinite(out.tokens).all()
    assert math.isfinite(float(out.returns.sum()))


# --------------------------------------------------------------------------- the default GTPO
# What the default normalisation must do, whatever the paper's reading: no preference where the
# outcomes carry none, the outcome's sign on every turn, GRPO on one turn, order-free.

DEFAULT = GTPOConfig(shaping=False)


def _gtpo_turns(rows: list[list[float]], groups: list[int] | None = None,
                cfg: GTPOConfig = DEFAULT) -> torch.Tensor:
    groups = groups or [0] * len(rows)
    spans = [[(2 + 3 * j, 4 + 3 * j) for j in range(len(r))] for r in rows]
    return get_advantage("gtpo")(RolloutBatch.build(groups, rows, spans), cfg).turns


def test_default_all_correct_in_two_turns_is_zero():
    # The artefact of pooling turn positions: 4 trajectories correct in 2 turns have returns
    # [0.9, 1.0] each; pooled (scope group): mean 0.95, std sqrt(8 * 0.05^2 / 7) = 0.053452,
    # so every one gets +-0.05 / (0.053452 + 1e-6) = +-0.935396; per turn: 0.
    rows = [[0.0, 1.0]] * 4
    close(_gtpo_turns(rows, cfg=GTPOConfig(norm_scope="group")), [[-0.935396, 0.935396]] * 4)
    close(_gtpo_turns(rows), [[0.0, 0.0]] * 4)


def test_default_tool_turn_not_pushed_down_by_correct_no_tool_answer():
    # 3 correct with the tool ([0, 1]: R = [0.9, 1]) + 1 correct guess ([1 - 0.1]: R = [0.9]).
    # Pooled, the tool turns get -0.80; per turn, turn 0 sees [0.9] * 4 and turn 1 [1] * 3.
    rows = [[0.0, 1.0]] * 3 + [[0.9]]
    pooled = _gtpo_turns(rows, cfg=GTPOConfig(norm_scope="group"))
    assert pooled[:3, 0].max() < -0.79
    close(_gtpo_turns(rows), [[0.0, 0.0]] * 4)


@st.composite
def _group(draw, equal_length: bool):
    size = draw(st.integers(2, 8))
    length = draw(st.integers(1, 4))
    lengths = [length] * size if equal_length else draw(
        st.lists(st.integers(1, 4), min_size=size, max_size=size))
    return size, lengths


@settings(max_examples=60, deadline=None)
@given(_group(equal_length=True),
       st.lists(st.sampled_from([-0.2, -0.1, 0.0, 0.5, 1.0]), min_size=4, max_size=4),
       st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_default_equal_rewards_and_lengths_give_zero(group, pattern, gamma):
    size, lengths = group
    rows = [pattern[: lengths[0]]] * size
    turns = _gtpo_turns(rows, cfg=GTPOConfig(shaping=False, gamma=gamma))
    assert (turns == 0).all()


@settings(max_examples=80, deadline=None)
@given(_group(equal_length=True), st.data(), st.sampled_from([0.5, 0.9, 1.0]))
def test_default_mixed_group_keeps_the_outcome_sign_on_every_turn(group, data, gamma):
    # Equal lengths, outcome-only rewards (1 on a correct final turn), the same format penalties
    # at the same turns of every trajectory: correct turns > 0, wrong turns < 0.
    size, lengths = group
    T = lengths[0]
    correct = data.draw(st.lists(st.booleans(), min_size=size, max_size=size)
                        .filter(lambda c: any(c) and not all(c)))
    penalty = data.draw(st.lists(st.sampled_from([0.0, -0.1]), min_size=T, max_size=T))
    rows = [[p + (1.0 if ok and j == T - 1 else 0.0) for j, p in enumerate(penalty)]
            for ok in correct]
    turns = _gtpo_turns(rows, cfg=GTPOConfig(shaping=False, gamma=gamma))
    ok = t(correct)
    assert (turns[ok] > 0).all() and (turns[~ok] < 0).all()


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.lists(
    st.lists(st.sampled_from([0.0, -0.1]), min_size=1, max_size=3), max_size=4))
def test_default_correct_tool_turn_never_below_zero_beside_a_correct_guess(tools, guesses, wrong):
    # Correct tool trajectories (tool turn, then the right answer), correct no-tool answers
    # (accuracy 1, first-turn format penalty -0.1) and any wrong trajectories: the tool turn of a
    # correct trajectory never gets a negative advantage.
    rows = [[0.0, 1.0]] * tools + [[0.9]] * guesses + wrong
    turns = _gtpo_turns(rows)
    assert (turns[:tools, 0] >= 0).all()


@settings(max_examples=40, deadline=None)
@given(rollouts(max_turns=1))
def test_default_one_turn_equals_grpo(batch):
    gtpo = get_advantage("gtpo")(batch, DEFAULT)
    grpo = get_advantage("grpo")(batch, GRPOConfig())
    torch.testing.assert_close(gtpo.tokens, grpo.tokens, atol=1e-6, rtol=0)


def test_global_scope_pools_the_whole_batch():
    # Two groups of one trajectory each: per group nothing to compare (0), but the global
    # reading pools the batch's 3 turn returns [0.9, 1.0, 0.0]: mean 0.633333, std 0.550757.
    rows = [[0.0, 1.0], [0.0]]
    close(_gtpo_turns(rows, groups=[0, 1]), [[0.0, 0.0], [0.0, 0.0]])
    close(_gtpo_turns(rows, groups=[0, 1], cfg=GTPOConfig(norm_scope="global")),
          [[0.484182, 0.665750], [-1.149932, 0.0]])
