"""verl adapter: GTPO as a verl advantage estimator, and an agent loop that plays our env.

Tested with ``verl==0.9.1`` (``pip install tir-gym[verl]``; verl pins ``transformers<5.11``, so it
usually lives in a venv of its own). Importing this module registers both:

- ``adv_estimator: gtpo``: :func:`compute_gtpo_advantage`, a thin wrapper over
  :func:`algos.advantages.gtpo_turn_advantages`. verl hands an estimator ``token_level_rewards``,
  ``response_mask``, ``index`` (group uids) and the ``algorithm`` config. Turns are recovered from
  the response mask: turn j is the j-th run of 1s (generated tokens), and the 0s after it (tool
  output) belong to it too. Turn j's reward is the sum of the token rewards in that stretch.
  GTPO's discount is ``algorithm.gamma``; returns are normalised per turn position within each
  group (our default ``norm_scope="turn"``), or, with ``norm_adv_by_std_in_grpo: false``, only
  centred by the group's mean (``norm_scope="none"``, Dr.GRPO style). When verl passes ``non_tensor_batch``
  with a ``turn_scores`` column, as the agent loop below fills it, those per-turn rewards are used
  instead.
- ``agent_name: tir_agent``: :class:`TIRAgentLoop`, which runs one episode of our env per dataset
  row against verl's async LLM server (vLLM/SGLang via ``server_manager.generate``), token in /
  token out: tool output is tokenized and masked (``response_mask`` 0), and each turn stops at
  the closing code fence. Its ``reward_score`` is the episode's summed turn rewards;
  ``extra_fields`` carry ``turn_scores``, ``turn_spans``, ``correct`` and ``problem_id``.

Per-turn rewards and verl 0.9.1: verl writes an agent loop's ``reward_score`` on the last response
token, and ``compute_advantage`` passes ``non_tensor_batch`` only to its own GDPO estimator. In a
stock verl run the estimator therefore sees the trajectory reward on the final turn. That is
GTPO with ``turn_rewards=False``: the outcome is discounted back to earlier turns and normalised
per turn position. Full turn-level rewards need one of two changes on verl's side:
``compute_advantage`` passing ``non_tensor_batch`` to registered estimators (then
``turn_scores`` is used), or a reward manager whose ``assemble_rm_scores`` puts each turn's score
on its last token.

The YAML that selects both (README "Use with TRL / verl / SkyRL / GEM" has the full command)::

    algorithm:
      adv_estimator: gtpo
      gamma: 0.9                      # GTPO's turn discount (verl's default 1.0 = no discount)
      norm_adv_by_std_in_grpo: true
    actor_rollout_ref:
      rollout:
        agent:
          default_agent_loop: tir_agent
          agent_loop_config_path: tir_agent.yaml
    # tir_agent.yaml:
    # - name: tir_agent
    #   _target_: algos.integrations.verl.TIRAgentLoop
    #   env_id: TIR-Math-v0
    #   max_turns: 4
    #   max_turn_tokens: 512

Every verl process, Ray actors included, must import this module. verl does that for modules
named in ``VERL_USE_EXTERNAL_MODULES=algos.integrations.verl``, which Ray actors inherit on one
machine; on a cluster, set it in ``ray_kwargs.ray_init.runtime_env.env_vars``.

Dataset rows name their problem with ``problem_id`` (a column, or a key of ``extra_info``).
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import numpy as np
import torch
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopBase,
    AgentLoopMetrics,
    AgentLoopOutput,
    register,
)
from verl.trainer.ppo.core_algos import register_adv_est

from algos.advantages import gtpo_turn_advantages
from algos.batch import turn_to_tokens
from algos.rollout import CLOSING_FENCE, prompt_token_ids

__all__ = ["TIRAgentLoop", "compute_gtpo_advantage", "turn_layout"]

DEFAULT_GAMMA = 0.9
"""GTPO's discount when no verl config is given (verl's own ``algorithm.gamma`` defaults to 1.0)."""


def turn_layout(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turns of each response from its mask.

    Returns ``turn_index`` long[B, L] (j of the run of 1s a generated token is in, -1 on 0s),
    ``segment`` long[B, L] (j for a token of run j and for the 0s that follow it up to the next
    run, -1 before the first run) and ``turn_mask`` bool[B, T].
    """
    mask = response_mask.bool()
    previous = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    starts = mask & ~previous
    segment = starts.long().cumsum(1) - 1
    turn_index = torch.where(mask, segment, -1)
    counts = starts.sum(1)
    T = max(1, int(counts.max()) if counts.numel() else 1)
    turn_mask = torch.arange(T)[None, :] < counts[:, None]
    return turn_index, segment, turn_mask


def _group_ids(index: Any, n: int) -> torch.Tensor:
    if index is None:
        return torch.arange(n)
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


@register_adv_est("gtpo")
def compute_gtpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    epsilon: float = 1e-6,
    non_tensor_batch: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl estimator ``gtpo``: GTPO's per-turn advantages on every generated token.

    Returns ``(advantages, returns)`` of shape ``[B, L]``, as verl expects; ``returns`` are the
    discounted turn returns R_ij on turn j's tokens.
    """
    device = token_level_rewards.device
    rewards_tok = token_level_rewards.detach().float().cpu()
    turn_index, segment, turn_mask = turn_layout(response_mask.detach().cpu())
    B, T = turn_mask.shape
    turn_scores = None if non_tensor_batch is None else non_tensor_batch.get("turn_scores")
    if turn_scores is not None and all(s is not None for s in turn_scores):
        rewards = torch.zeros(B, T)
        for i, scores in enumerate(turn_scores):
            n = min(len(scores), int(turn_mask[i].sum()))
            rewards[i, :n] = torch.as_tensor(list(scores)[:n], dtype=torch.float32)
    else:
        # Rewards inside a turn's span or its tool output count for that turn.
        where = segment.clamp(min=0) + T * torch.arange(B)[:, None]
        rewards = torch.zeros(B * T).index_add_(0, where.flatten(), rewards_tok.flatten())
        rewards = rewards.view(B, T)
    gamma = DEFAULT_GAMMA if config is None else float(config.get("gamma", DEFAULT_GAMMA))
    scale = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    valid = turn_mask.any(1)
    returns, turns = gtpo_turn_advantages(
        rewards * turn_mask, turn_mask, _group_ids(index, B), valid, gamma,
        "turn" if scale else "none", epsilon)
    advantages = turn_to_tokens(turns, turn_index)
    token_returns = turn_to_tokens(returns, turn_index)
    return advantages.to(device), token_returns.to(device)


@register("tir_agent")
class TIRAgentLoop(AgentLoopBase):
    """One TIR episode per dataset row against verl's async LLM server.

    Extra constructor arguments (from the agent loop YAML): ``env_id`` (default
    ``TIR-Math-v0``), ``env_kwargs`` (``gymnasium.make`` arguments; ``sandbox_backend`` and
    ``sandbox_kwargs`` pick the shared sandbox), ``max_turns`` (4) and ``max_turn_tokens``
    (per-turn generation budget, default the rollout's ``response_length``).
    """

    def __init__(self, *args, env_id: str = "TIR-Math-v0", env_kwargs: dict | None = None,
                 max_turns: int = 4, max_turn_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.response_length = int(self.rollout_config.response_length)
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.max_turns = int(max_turns)
        self.max_turn_tokens = int(max_turn_tokens or self.response_length)

    def _make_env(self):
        from tir_envs.integrations import make_tir_env

        return make_tir_env(self.env_id, tokenizer=self.tokenizer, max_turns=self.max_turns,
                            **self.env_kwargs)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        problem_id = kwargs.get("problem_id") or (kwargs.get("extra_info") or {}).get("problem_id")
        if problem_id is None:
            raise ValueError("TIRAgentLoop needs a problem_id column (or extra_info.problem_id)")
        env = await asyncio.to_thread(self._make_env)
        try:
            return await self._episode(env, str(problem_id), sampling_params)
        finally:
            await asyncio.to_thread(env.close)

    async def _episode(self, env, problem_id: str, sampling_params: dict[str, Any]):
        obs, _ = await asyncio.to_thread(env.reset, options={"problem_id": problem_id})
        prompt_ids = prompt_token_ids(self.tokenizer, obs)
        response, mask, logprobs = [], [], []
        turn_scores, spans, info = [], [], {}
        request_id = uuid4().hex  # one id per episode: the server keeps its prefix cache warm
        params = {**sampling_params, "stop": [CLOSING_FENCE], "include_stop_str_in_output": True}
        while True:
            budget = min(self.max_turn_tokens, self.response_length - len(response))
            output = await self.server_manager.generate(
                request_id=request_id, prompt_ids=prompt_ids + response,
                sampling_params={**params, "max_tokens": budget})
            generated = list(output.token_ids)[:budget]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            obs, reward, terminated, truncated, info = await asyncio.to_thread(env.step, text)
            spans.append((len(response), len(response) + len(generated)))
            turn_scores.append(float(reward))
            response += generated
            mask += [1] * len(generated)
            logprobs += list(output.log_probs or [0.0] * len(generated))[: len(generated)]
            if terminated or truncated:
                break
            env_ids = self.tokenizer(obs, add_special_tokens=False)["input_ids"]
            if len(response) + len(env_ids) >= self.response_length:
                break  # no room for the tool output and another turn: the episode ends here
            response += env_ids
            mask += [0] * len(env_ids)
            logprobs += [0.0] * len(env_ids)
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response,
            response_mask=mask,
            response_logprobs=logprobs if sampling_params.get("logprobs") else None,
            reward_score=float(sum(turn_scores)),
            num_turns=2 * len(turn_scores) + 1,  # user, then assistant and tool per turn
            metrics=AgentLoopMetrics(),
            extra_fields={"turn_scores": turn_scores, "turn_spans": spans,
                          "correct": bool(info.get("correct")), "problem_id": problem_id},
        )
