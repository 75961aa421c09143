"""One rank of ``tests/test_distributed.py``: ``Agent.update`` on this rank's share of saved batches.

Run under torchrun (``python -m torch.distributed.run --standalone --nproc_per_node 2 -m
tests.distributed_worker CASES OUT``): for each case in the file ``CASES`` every rank builds the
same tiny model, takes its contiguous share of the case's rows (whole groups) and writes its
weights and update metrics to ``OUT/<case>-rank<r>.pt``. The test runs the same cases in one
process on every row and compares. Last, rank 1 moves a weight of its own and each rank writes
whether ``check_same_weights`` caught it (``OUT/diverged-rank<r>.pt``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

import algos
from algos.agent import token_logprobs
from algos.batch import RolloutBatch, TokenBatch
from algos.config import GRPOConfig, PPOConfig
from algos.distributed import make_accelerator
from algos.tiny import tiny_model, tiny_tokenizer

GROUPS, GROUP_SIZE = 2, 4
BASE = dict(prompts_per_iteration=GROUPS, group_size=GROUP_SIZE, minibatch_size=8,
            grad_accum_steps=2, update_epochs=2, lr=1e-3, seed=0)
"""One minibatch of the whole batch per epoch, two epochs (the second step sees ratios away
from 1, so clipping takes part), each rank's 4 rows in 2 micro-batches of 2."""


def synthetic_batch(flat_groups: tuple[int, ...] = (), seed: int = 0):
    """Two groups of 4 two-turn trajectories; group 0's turns are long and group 1's short, so
    the ranks' token counts differ and a per-rank loss divisor would weight them differently.
    A flat group has equal rewards (all its advantages 0). Old logprobs are the model's own
    plus noise, so ratios start near 1 as after a real rollout."""
    g = torch.Generator().manual_seed(seed)
    prompt, gap = 6, 4
    spans, rewards = [], []
    for row in range(GROUPS * GROUP_SIZE):
        group = row // GROUP_SIZE
        first, second = (10 + row % 3, 8) if group == 0 else (3 + row % 2, 2)
        start2 = prompt + first + gap
        spans.append([(prompt, prompt + first), (start2, start2 + second)])
        rewards.append([0.0, 0.5 if group in flat_groups else float(row % 2)])
    lengths = [s[-1][1] for s in spans]
    width = max(lengths)
    batch = RolloutBatch.build([row // GROUP_SIZE for row in range(len(spans))], rewards, spans,
                               seq_len=width)
    input_ids = torch.randint(10, 500, (len(spans), width), generator=g)
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        logits = tiny_model(seed=0, tokenizer=tiny_tokenizer())(
            input_ids=input_ids, attention_mask=attention_mask).logits
    logprobs, _ = token_logprobs(logits, input_ids, batch.loss_mask, 1.0)
    noise = 0.05 * torch.randn(logprobs.shape, generator=g)
    old_logprobs = torch.where(batch.loss_mask, logprobs + noise, 0.0)
    return TokenBatch(input_ids, attention_mask, old_logprobs), batch


CONFIGS = {"grpo": GRPOConfig, "ppo": PPOConfig}


def make_case(name: str, flat_groups: tuple[int, ...] = (), algo: str = "grpo", **config) -> dict:
    tokens, batch = synthetic_batch(flat_groups)
    return {"name": name, "algo": algo, "config": {**BASE, **config}, "tokens": tokens,
            "batch": batch}


def rows_of(case: dict, rows: slice) -> tuple[TokenBatch, RolloutBatch]:
    tokens, batch = case["tokens"], case["batch"]
    return (TokenBatch(*(getattr(tokens, f.name)[rows] for f in dataclasses.fields(tokens))),
            batch.replace(**{f.name: getattr(batch, f.name)[rows]
                             for f in dataclasses.fields(batch)}))


def make_agent(algo: str, config, accelerator=None):
    """A fresh tiny agent, the same in every process (PPO's value head is seeded too)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return algos.make(algo, tiny_model(seed=0, tokenizer=tokenizer), "TIR-Math-v0", config,
                          tokenizer=tokenizer, accelerator=accelerator)


def run_update(case: dict, accelerator=None, rows: slice = slice(None)):
    """The weights and metrics after one ``Agent.update`` of a fresh tiny agent on ``rows`` of
    the case. Advantages come from the rows' own (whole) groups, as on a rank."""
    tokens, batch = rows_of(case, rows)
    config = CONFIGS[case["algo"]](**case["config"])
    agent = make_agent(case["algo"], config, accelerator)
    values = agent.rollout_values(tokens, batch)
    advantages = agent.estimator(batch, config, values)
    metrics = agent.update(tokens, batch, advantages, values)
    state = {k: v.detach().clone() for k, v in agent.trainable.state_dict().items()}
    return state, metrics


def main(cases_file: str, out: str) -> None:
    torch.set_num_threads(1)
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    for case in torch.load(cases_file, weights_only=False):
        share = GROUPS * GROUP_SIZE // world
        state, metrics = run_update(case, accelerator, slice(rank * share, (rank + 1) * share))
        torch.save({"state": state, "metrics": metrics},
                   Path(out) / f"{case['name']}-rank{rank}.pt")
    agent = make_agent("grpo", GRPOConfig(**BASE), accelerator)
    with torch.no_grad():
        next(agent.trainable.parameters()).add_(rank)
    try:
        agent.ranks.check_same_weights(agent.trainable)
        caught = False
    except RuntimeError:
        caught = True
    torch.save(caught, Path(out) / f"diverged-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
