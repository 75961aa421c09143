"""PPO with a critic: a value head on the policy's last hidden state, each turn's reward on its
last generated token, token-level GAE over generated tokens (estimator ``gae``) and a clipped
value loss beside the clipped policy loss."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from algos.agent import Agent, logits_needed, register_algorithm
from algos.batch import RolloutBatch, TokenBatch
from algos.config import PPOConfig
from algos.losses import value_loss
from algos.models import PolicyWithValue


def values_before_tokens(hidden_values: Tensor) -> Tensor:
    """``values[t]`` estimates the return before token t is sampled, so it is read off the state
    that predicts token t (position t - 1); position 0 predicts nothing and gets 0."""
    return torch.nn.functional.pad(hidden_values[:, :-1], (1, 0))


@register_algorithm("ppo")
class PPO(Agent):
    config_class = PPOConfig

    def build_trainable(self, policy) -> PolicyWithValue:
        return PolicyWithValue(policy, critic_trains_trunk=self.config.critic_trains_trunk)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Values at every position; logits only where ``loss_mask`` needs them (all when None)."""
        keep = logits_needed(loss_mask) if loss_mask is not None else 0
        logits, hidden_values = self.parallel_model(input_ids, attention_mask,
                                                    logits_to_keep=keep)
        return logits, values_before_tokens(hidden_values)

    @torch.no_grad()
    def rollout_values(self, tokens: TokenBatch, batch: RolloutBatch) -> Tensor:
        micro = self.config.minibatch_size // self.config.grad_accum_steps
        values = torch.zeros(tokens.input_ids.shape)
        for start in range(0, values.shape[0], micro):
            rows = slice(start, start + micro)
            ids = tokens.input_ids[rows].to(self.device)
            _, v = self.trainable(ids, tokens.attention_mask[rows].to(self.device),
                                  logits_to_keep=1)  # values only: skip the LM head
            values[rows] = values_before_tokens(v).float().cpu()
        return values * batch.loss_mask

    def extra_loss(self, values, minibatch, denominator):
        out = value_loss(
            values, minibatch["old_values"], minibatch["returns"], minibatch["loss_mask"],
            clip=self.config.value_clip, aggregation=self.config.loss_aggregation,
            constant=self.loss_constant(), denominator=denominator,
        )
        return self.config.vf_coef * out.loss, {f"loss/{k}": float(v) for k, v in out.metrics.items()}

    def load_weights(self, model_dir: Path) -> None:
        saved, _ = PolicyWithValue.from_pretrained(model_dir, dtype=self.policy.dtype)
        self.trainable.load_state_dict(saved.state_dict())
