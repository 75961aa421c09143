"""PPO with a critic: a value head on the policy's last hidden state, each turn's reward on its
last generated token, token-level GAE over generated tokens (estimator ``gae``) and a clipped
value loss beside the clipped policy loss."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from algos.agent import Agent, TokenBatch, register_algorithm
from algos.batch import RolloutBatch
from algos.config import PPOConfig
from algos.losses import value_loss
from algos.models import PolicyWithValue


@register_algorithm("ppo")
class PPO(Agent):
    config_class = PPOConfig

    def build_trainable(self, policy) -> PolicyWithValue:
        return PolicyWithValue(policy)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        logits, hidden_values = self.trainable(input_ids, attention_mask)
        # values[t] estimates the return before token t is sampled: the state that predicts it.
        values = torch.zeros_like(hidden_values)
        values[:, 1:] = hidden_values[:, :-1]
        return logits, values

    @torch.no_grad()
    def rollout_values(self, tokens: TokenBatch, batch: RolloutBatch) -> Tensor:
        micro = self.config.minibatch_size // self.config.grad_accum_steps
        values = torch.zeros(tokens.input_ids.shape)
        for start in range(0, values.shape[0], micro):
            rows = slice(start, start + micro)
            _, v = self.forward(tokens.input_ids[rows].to(self.device),
                                tokens.attention_mask[rows].to(self.device))
            values[rows] = v.float().cpu()
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
