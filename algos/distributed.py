"""Data-parallel training across processes: what the agent needs from ``accelerate``, in one place.

Each of N ranks rolls out its own whole prompt groups (group statistics and code-similarity
shaping need every sample of a prompt on one rank) and trains on them; ``accelerate`` wraps the
trained module in DDP (gloo on CPU, nccl on GPU) or, with its FSDP plugin, shards it. The agent
talks to the other ranks only through :class:`Ranks`, which on a single process is the identity,
so the one-process path runs the same code without a process group.

Launch with ``tir train --nproc N`` (one node), or ``torchrun`` / ``accelerate launch`` for
several nodes: every process runs the same ``tir train`` command line.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

SUMMED = frozenset({
    "groups/all_correct", "groups/no_signal", "tokens/generated", "tokens/updated",
    "tokens/forward", "tokens/forward_padded", "update/rows_forward", "update/rows_in_loss",
    "update/rows_with_signal",
})
"""Iteration metrics that count things: the ranks' values add up. ``time/*`` keys take the
slowest rank's value (every rank waits for it); every other metric is the ranks' mean, exact
for per-trajectory means since each rank holds as many trajectories."""


def launched_ranks() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


COLLECTIVE_TIMEOUT = timedelta(hours=2)
"""How long a rank waits in a collective: rank 0 evaluates and checkpoints alone while the
others wait in their next one, and an evaluation of a large model can outlast torch's default
30 minutes."""


def make_accelerator(fsdp: bool = False):
    """An ``accelerate.Accelerator`` for a launched multi-process run, else None.

    On a machine without CUDA it runs on the CPU over gloo; with CUDA, one GPU per rank over
    nccl. ``fsdp`` adds accelerate's default FSDP plugin; a config written by ``accelerate
    config`` (``accelerate launch --config_file``) reaches the Accelerator through the
    environment and needs no flag.
    """
    if launched_ranks() == 1:
        return None
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        fsdp_plugin=FullyShardedDataParallelPlugin() if fsdp else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
    )


def check_split(config, world: int) -> None:
    """Fail unless ``config``'s batch splits into whole prompt groups on ``world`` ranks, and
    each rank's share of a minibatch into ``grad_accum_steps`` micro-batches."""
    if world == 1:
        return
    if config.prompts_per_iteration % world:
        raise ValueError(
            f"prompts_per_iteration ({config.prompts_per_iteration}) must be a multiple of the "
            f"{world} processes: each rolls out and trains whole prompt groups")
    if config.minibatch_size % (config.grad_accum_steps * world):
        raise ValueError(
            f"minibatch_size ({config.minibatch_size}) must be a multiple of grad_accum_steps x "
            f"processes ({config.grad_accum_steps} x {world}): each rank's share of a "
            "minibatch is split into micro-batches")


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs the ``python -m algos.cli`` command line ``argv`` in ``nproc``
    processes on this machine: ``torchrun --standalone`` through ``torch.distributed.run``, so
    it uses this interpreter. ``--nproc`` is dropped from ``argv``: the processes learn their
    number from the launcher (and torchrun's parser would take ``--nproc`` for its own
    ``--nproc-per-node``)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "algos.cli", *rest]


class Ranks:
    """The processes one training run spans, seen from one of them.

    Built from an ``accelerate.Accelerator`` (several processes) or None (one process, where
    every collective is the identity and nothing is wrapped).
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    @property
    def fsdp(self) -> bool:
        if self.accelerator is None:
            return False
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def prepare(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """The module as the update calls it (DDP- or FSDP-wrapped) and its optimizer."""
        if self.accelerator is None:
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    def gather(self, x: Tensor) -> Tensor:
        """``[world, *x.shape]``: every rank's ``x``, on every rank, in rank order."""
        if self.accelerator is None:
            return x[None]
        out = self.accelerator.gather(x[None].to(self.accelerator.device))
        return out.view(self.world, *x.shape).cpu()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        if self.accelerator is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def no_sync(self, module: torch.nn.Module, skip: bool):
        """Hold back the gradient all-reduce of backward passes under it when ``skip``: every
        micro-batch but a minibatch's last accumulates locally, and the last syncs the sum."""
        if self.accelerator is None or not skip:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module)

    def clip_grad_norm_(self, module: torch.nn.Module, max_norm: float) -> Tensor:
        """Clip the global gradient norm (across shards under FSDP)."""
        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
        return self.accelerator.clip_grad_norm_(module.parameters(), max_norm)

    def check_same_weights(self, module: torch.nn.Module) -> None:
        """Fail when the ranks' copies of ``module`` differ: DDP keeps replicas equal only when
        they start equal, and weights loaded on one rank alone (a warm-up, a resume) would
        otherwise train apart unnoticed. Under FSDP each rank holds a different shard."""
        if self.world == 1 or self.fsdp:
            return
        with torch.no_grad():
            sums = torch.stack([p.double().sum() for p in module.parameters()]).cpu()
        everyone = self.gather(sums)
        if not torch.equal(everyone, sums.expand_as(everyone)):
            raise RuntimeError(f"rank {self.rank}: the ranks' copies of the model differ")

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def main_first(self):
        """Rank 0 runs the block first (e.g. writes a cache), then the others run it."""
        if self.accelerator is None:
            return contextlib.nullcontext()
        return self.accelerator.main_process_first()

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """One iteration's metrics over all ranks (see :data:`SUMMED`); the same on every rank."""
        return reduce_metrics(self.gather_objects(metrics))


def reduce_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Combine the ranks' iteration metrics: counts add, times take the slowest rank, the rest
    average; ``reward/std`` is the pooled standard deviation of the ranks' equal-sized batches."""
    if len(per_rank) == 1:
        return dict(per_rank[0])
    out: dict[str, float] = {}
    for key in per_rank[0]:
        values = [m[key] for m in per_rank]
        if key in SUMMED:
            out[key] = sum(values)
        elif key.startswith("time/"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    if "reward/std" in out:
        means = [m["reward/mean"] for m in per_rank]
        second = sum(m["reward/std"] ** 2 + m["reward/mean"] ** 2 for m in per_rank) / len(per_rank)
        out["reward/std"] = math.sqrt(max(second - (sum(means) / len(means)) ** 2, 0.0))
    return out
