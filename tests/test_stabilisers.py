"""Training stabilisers: void-turn filtering, zero-variance groups, learning-rate warm-up and
gradient-norm clipping (clip-higher and the KL penalty are checked in test_losses.py)."""

from __future__ import annotations

import pytest
import torch

import algos
import tir_envs  # noqa: F401  (registers the env ids)
from algos.agent import loss_rows
from algos.batch import RolloutBatch
from algos.config import GRPOConfig, GTPOConfig
from algos.rollout import RolloutConfig, Turn
from algos.tiny import tiny_model, tiny_tokenizer

ROLLOUT = RolloutConfig(max_new_tokens=24, max_turns=2, max_total_tokens=768)


def _turn(**info) -> Turn:
    return Turn(generated_ids=[1], logprobs=[0.0], env_ids=[], reward=0.0, info=info,
                finish_reason="stop")


@pytest.mark.parametrize("info, void", [
    ({"tool_called": True, "format_error": None}, False),            # a code block that ran
    ({"tool_called": True, "format_error": "syntax_error"}, False),  # complete, just wrong
    ({"tool_called": True, "format_error": "unclosed_fence"}, True),  # cut off mid-block
    ({"tool_called": True, "format_error": "empty_code"}, True),
    ({"tool_called": False, "format_error": "action_too_long"}, True),
    ({"tool_called": False, "final_answer": "42"}, False),           # an answer, right or wrong
    ({"tool_called": False, "final_answer": None}, True),            # final turn, nothing boxed
])
def test_void_turn_is_neither_complete_code_nor_an_answer(info, void):
    assert _turn(**info).void is void


def _batch(rewards: list[float], groups: list[int], void: list[bool]) -> RolloutBatch:
    return RolloutBatch.build(groups, [[r] for r in rewards], [[(1, 3)]] * len(rewards),
                              infra_error=[False] * (len(rewards) - 1) + [True], void=void)


def test_loss_rows_filters_void_trajectories_and_flat_groups():
    # Group 0 mixed, group 1 all equal (no signal), group 2's last row is an infra error.
    batch = _batch([1.0, 0.0, 0.5, 0.5, 1.0, 0.0], [0, 0, 1, 1, 2, 2],
                   [False, True, False, False, False, False])
    advantages = algos.advantages.get_advantage("grpo")(batch, GRPOConfig()).tokens
    rows = lambda **kw: loss_rows(batch, advantages, GRPOConfig(**kw)).tolist()  # noqa: E731
    assert rows() == [True] * 5 + [False]
    assert rows(void_turn_filter=True) == [True, False, True, True, True, False]
    # Group 2 has one valid row: no spread, no signal, dropped with group 1.
    assert rows(zero_variance_groups="drop") == [True, True, False, False, False, False]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def length_reward(outcome):
    return {"accuracy": 0.0, "format": 0.0, "length": 0.1 * (len(outcome.action) % 5)}


def _agent(tokenizer, run_dir=None, **overrides):
    config = GTPOConfig(prompts_per_iteration=2, group_size=2, minibatch_size=2,
                        grad_accum_steps=1, lr=1e-3, seed=0, **overrides)
    return algos.make("gtpo", tiny_model(seed=0, tokenizer=tokenizer), "TIR-Math-v0", config,
                      tokenizer=tokenizer, rollout=ROLLOUT, run_dir=run_dir,
                      env_kwargs={"reward_fn": length_reward})


def test_lr_warmup_ramps_per_optimizer_step_and_resumes(tokenizer, tmp_path):
    with _agent(tokenizer, run_dir=tmp_path, lr_warmup_steps=8) as agent:
        metrics = agent.train_iteration()
        agent.save_checkpoint()
        steps = metrics["update/steps"]
        assert steps >= 1
        # Step k (0-based) runs at lr * (k + 1) / 8; the metric is the mean over the steps.
        expected = 1e-3 * sum((k + 1) / 8 for k in range(steps)) / steps
        assert metrics["lr"] == pytest.approx(expected)
        assert agent.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (steps + 1) / 8)
    with _agent(tokenizer, run_dir=tmp_path, lr_warmup_steps=8) as resumed:
        assert resumed.resume()
        assert resumed.scheduler.last_epoch == steps
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (steps + 1) / 8)


def test_update_takes_ceil_batch_over_minibatch_steps_per_epoch(tokenizer):
    # 4 trajectories, minibatch 2: two steps per epoch. An entropy bonus reads every row, so no
    # row is skipped for having zero advantages and every step runs.
    for epochs in (1, 2):
        with _agent(tokenizer, entropy_coef=1e-3, update_epochs=epochs) as agent:
            metrics = agent.train_iteration()
        assert metrics["update/steps"] == 2 * epochs
        assert metrics["update/rows_in_loss"] == 4


def test_zero_variance_drop_leaves_flat_groups_out_of_the_loss(tokenizer):
    with _agent(tokenizer, zero_variance_groups="drop") as agent:
        metrics = agent.train_iteration()
    informative = 2 - metrics["groups/no_signal"]
    assert metrics["update/rows_in_loss"] == 2 * informative


def test_grad_norm_clipping_bounds_the_step(tokenizer):
    def change(max_grad_norm: float) -> float:
        with _agent(tokenizer, max_grad_norm=max_grad_norm) as agent:
            before = [p.detach().clone() for p in agent.policy.parameters()]
            # Plain SGD: the step is lr * clipped gradient, so the clip shows in the change.
            agent.optimizer = torch.optim.SGD(agent.policy.parameters(), lr=1.0)
            agent.scheduler = torch.optim.lr_scheduler.LambdaLR(agent.optimizer, lambda s: 1.0)
            metrics = agent.train_iteration()
            assert metrics["grad_norm"] > 0  # reported before clipping
            moved = [(p.detach() - b).flatten() for p, b in zip(agent.policy.parameters(), before)]
            return float(torch.cat(moved).norm()), metrics["update/steps"]

    clipped, steps = change(1e-3)
    assert 0 < clipped <= 1e-3 * steps + 1e-9
    free, _ = change(float("inf"))
    assert free > 10 * clipped
