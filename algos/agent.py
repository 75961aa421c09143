"""The shared ``Agent``: collect -> shape -> advantages -> update epochs -> metrics -> checkpoint.

Everything an algorithm does not change lives here; ``GTPO``, ``GRPO`` and ``PPO`` are short
subclasses that pick a config class and, for PPO, add a critic. One iteration:

1. sample ``prompts_per_iteration`` problems and roll each out ``group_size`` times
   (``algos.rollout.collect``) through a Gymnasium vector env of TIR envs;
2. lay the trajectories out as a ``RolloutBatch`` plus padded token tensors;
3. GTPO's code-similarity shaping (``algos.shaping``) when the config asks for it;
4. the registered advantage estimator (``algos.advantages``);
5. ``update_epochs`` passes of clipped policy-gradient steps over shuffled minibatches, each
   split into ``grad_accum_steps`` micro-batches;
6. metrics to JSONL + TensorBoard, and an atomic checkpoint.

Every random draw of an iteration is seeded from ``(config.seed, iteration)``, so a run killed
after checkpoint k and resumed computes exactly what the uninterrupted run would have.

Across N processes (``algos.distributed``) each rank runs steps 1-5 on its own
``prompts_per_iteration / N`` whole prompt groups; the loss divisor, the steps taken and the
micro-steps run are agreed across ranks, and rank 0 alone logs and checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import gymnasium
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from algos.advantages import check_config, get_advantage
from algos.batch import RolloutBatch, TokenBatch, rollout_batch
from algos.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from algos.config import AlgoConfig
from algos.distributed import Ranks, check_split
from algos.evaluation import evaluate_problems, heldout_problems, problem_source, summarize
from algos.generation import make_generator
from algos.generation.base import Generator, SamplingParams
from algos.losses import aggregation_total, policy_loss
from algos.metrics import MetricsLogger, trajectory_metrics
from algos.models import load_policy
from algos.rollout import RolloutConfig, Trajectory, collect, make_vec_env
from algos.shaping import shape_rewards
from tir_envs.registry import Registry

logger = logging.getLogger(__name__)


def logits_needed(loss_mask: Tensor) -> int:
    """How many trailing positions need logits: from the one before the first masked token."""
    first = int(loss_mask.float().argmax(1).min())
    return loss_mask.shape[1] - max(first - 1, 0)


def token_logprobs(
    logits: Tensor, input_ids: Tensor, mask: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``logprobs[b, t] = log pi(token_t | tokens_<t)`` and the entropy there, ``[B, L]``.

    ``logits`` may cover only the last K <= L positions (``logits_to_keep``), as long as every
    masked token is predicted by one of them. Only positions in ``mask`` are computed (a [N, V]
    slice, not [B, L, V]): on a 50k vocabulary the full log-softmax would dominate memory. Both
    are 0 off the mask.
    """
    offset = input_ids.shape[1] - logits.shape[1]
    if bool(mask[:, : offset + 1].any()):
        raise ValueError("logits must cover the position before every masked token")
    target = mask[:, offset + 1 :]
    selected = logits[:, :-1][target].float()
    if temperature > 0:
        selected = selected / temperature
    logp_all = torch.log_softmax(selected, dim=-1)
    picked = logp_all.gather(-1, input_ids[:, offset + 1 :][target].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zeros = torch.zeros(mask.shape, dtype=picked.dtype, device=logits.device)
    return zeros.masked_scatter(mask, picked), zeros.masked_scatter(mask, entropy.detach())


def loss_rows(batch: RolloutBatch, advantages: Tensor, cfg: AlgoConfig) -> Tensor:
    """bool[B]: the trajectories the loss sees. Infra errors never do; with
    ``void_turn_filter`` nor do trajectories with a void turn; with ``zero_variance_groups="drop"``
    nor do groups whose advantages are all 0."""
    rows = batch.valid.clone()
    if cfg.void_turn_filter:
        rows &= ~batch.void
    if cfg.zero_variance_groups == "drop":
        signal = (advantages != 0).any(1)
        _, group = torch.unique(batch.group_ids, return_inverse=True)
        informative = torch.zeros(int(group.max()) + 1, dtype=torch.bool).index_put_(
            (group,), signal, accumulate=True)
        rows &= informative[group]
    return rows


def advantage_metrics(
    trajectories: list[Trajectory], batch: RolloutBatch, advantages: Tensor
) -> dict[str, float]:
    """What the advantages say about the batch: groups that were all correct or carried no
    signal, void trajectories, and the share of correct trajectories' code turns pushed down
    (a negative mean advantage on a tool turn of a trajectory that ended correct)."""
    B, T = batch.turn_mask.shape
    index = batch.turn_index.clamp(min=0) + T * torch.arange(B)[:, None]
    inside = batch.loss_mask.flatten()
    per_turn = torch.zeros(B * T).index_add_(0, index.flatten()[inside],
                                              advantages.flatten()[inside].float())
    counts = torch.zeros(B * T).index_add_(0, index.flatten()[inside], torch.ones(int(inside.sum())))
    turn_adv = (per_turn / counts.clamp(min=1)).view(B, T)
    code = torch.zeros(B, T, dtype=torch.bool)
    for i, trajectory in enumerate(trajectories):
        for j, turn in enumerate(trajectory.turns):
            code[i, j] = bool(turn.info.get("tool_called"))
    correct_code = code & (batch.correct & batch.valid)[:, None] & (counts.view(B, T) > 0)
    _, group = torch.unique(batch.group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1
    wrong = torch.zeros(n_groups).index_add_(0, group, (~batch.correct & batch.valid).float())
    valid = torch.zeros(n_groups).index_add_(0, group, batch.valid.float())
    signal = torch.zeros(n_groups).index_add_(0, group, (advantages != 0).any(1).float())
    return {
        "groups/all_correct": float(((wrong == 0) & (valid > 0)).sum()),
        "groups/no_signal": float((signal == 0).sum()),
        "void_rate": float(batch.void.float().mean()),
        "adv/correct_code_turns_negative": (
            float((turn_adv[correct_code] < 0).float().mean()) if correct_code.any() else 0.0
        ),
    }


ALGORITHMS: Registry[type[Agent]] = Registry("algorithm")


def register_algorithm(name: str):
    """Class decorator: make an ``Agent`` subclass available as ``algos.make(name, ...)``."""

    def decorator(cls: type[Agent]) -> type[Agent]:
        ALGORITHMS.register(name, cls)
        cls.name = name
        return cls

    return decorator


class Agent:
    """An RL agent that trains a causal LM on a TIR env. Subclasses register themselves by name.

    ``model``: an HF model directory, hub id or ``.gguf`` (loaded with ``algos.models.load_policy``),
    or a loaded ``PreTrainedModel`` together with ``tokenizer``. ``env``: a registered env id (made
    ``prompts_per_iteration * group_size`` times, all sharing one sandbox) or a ready
    ``gymnasium.vector.VectorEnv`` of TIR envs with that many sub-envs. ``accelerator``: an
    ``accelerate.Accelerator`` of a multi-process run (``algos.distributed.make_accelerator``);
    each of its N ranks then rolls out ``prompts_per_iteration / N`` prompts.
    """

    name: ClassVar[str] = "agent"
    config_class: ClassVar[type[AlgoConfig]] = AlgoConfig

    def __init__(
        self,
        model: Any,
        env: str | gymnasium.vector.VectorEnv = "TIR-Math-v0",
        config: AlgoConfig | None = None,
        *,
        tokenizer: Any = None,
        rollout: RolloutConfig | None = None,
        env_kwargs: dict[str, Any] | None = None,
        run_dir: str | os.PathLike | None = None,
        generator: Generator | None = None,
        device: str = "cpu",
        accelerator: Any = None,
    ):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                f"{type(self.config).__name__}"
            )
        check_config(self.config)  # again: a config's fields can be changed after it was built
        self.rollout = rollout or RolloutConfig()
        if self.rollout.temperature == 0:
            raise ValueError("training needs sampled rollouts: rollout.temperature must be > 0")
        self.env_kwargs = dict(env_kwargs or {})
        self.ranks = Ranks(accelerator)
        self._check_ranks(generator, run_dir)
        self.device = self.ranks.device or torch.device(device)
        self._check_env(env)

        if isinstance(model, (str, os.PathLike)):
            model, loaded_tokenizer = load_policy(model, dtype=self.config.dtype,
                                                  device=str(self.device))
            tokenizer = tokenizer or loaded_tokenizer
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with a loaded model")
        self.policy = model
        self.tokenizer = tokenizer
        self.policy.train()
        self.trainable = self.build_trainable(self.policy)
        self.reference = self._make_reference() if self.config.kl_coef > 0 else None
        optimizer = torch.optim.AdamW(
            [p for p in self.trainable.parameters() if p.requires_grad],
            lr=self.config.lr,
            weight_decay=0.0,
        )
        warmup = self.config.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.parallel_model, self.optimizer = self.ranks.prepare(self.trainable, optimizer)
        """``trainable`` as the update's forward passes call it: DDP- or FSDP-wrapped across
        ranks (its gradients are all-reduced), ``trainable`` itself in one process."""
        self.generator = generator or make_generator("hf", model=self.policy, tokenizer=tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.estimator = get_advantage(self.config.advantage)
        self.iteration = 0
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._env = env
        self._vec_env: gymnasium.vector.VectorEnv | None = None
        self._sandbox = None
        self._metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------ what subclasses change

    def build_trainable(self, policy) -> torch.nn.Module:
        """The module the optimizer trains (PPO wraps the policy with a value head)."""
        return policy

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (of the positions that predict a ``loss_mask`` token, at least) and, for agents
        with a critic, values ``[B, L]``.

        Prompts are long next to the turns, so the LM head runs only from the position before
        the first generated token on (``logits_to_keep``): on SmolLM2 its 49k-wide projection
        is a fifth of the model's compute.
        """
        out = self.parallel_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False, logits_to_keep=logits_needed(loss_mask))
        return out.logits, None

    def extra_loss(self, values: Tensor | None, minibatch: dict[str, Tensor], denominator: float):
        """Loss terms beyond the policy loss (PPO's value loss): ``(loss or None, metrics)``."""
        return None, {}

    # ------------------------------------------------------------------ env

    def _check_ranks(self, generator: Generator | None, run_dir) -> None:
        """Fail before any work on what several processes cannot run (a batch that does not
        split into whole groups per rank; under FSDP, whatever needs whole weights on a rank),
        and warn of what they compute differently from one process."""
        cfg = self.config
        check_split(cfg, self.ranks.world)
        if self.ranks.world == 1:
            return
        from algos.generation.hf import HFGenerator

        if self.ranks.fsdp and (generator is None or isinstance(generator, HFGenerator)):
            raise ValueError(
                "under FSDP each rank holds a shard of the weights, and the local hf backend "
                "generates with the whole model: roll out on a generation server instead")
        if self.ranks.fsdp and run_dir is not None:
            raise ValueError(
                "checkpoints are written from rank 0's whole copy of the model, which FSDP does "
                "not keep: train under FSDP without a run_dir and save through accelerate")
        if self.ranks.is_main and (getattr(cfg, "norm_scope", None) in ("batch", "global")
                                   or getattr(cfg, "whiten_advantages", False)):
            logger.warning(
                "batch-wide advantage statistics (norm_scope batch/global, PPO whitening) are "
                "computed over each rank's share of the batch, not the whole batch")

    def _check_env(self, env) -> None:
        """Fail before any work when the env is not a TIR env."""
        if isinstance(env, str):
            import tir_envs  # noqa: F401  (registers the TIR env ids)

            try:
                spec = gymnasium.spec(env)
            except gymnasium.error.Error as exc:
                raise ValueError(f"unknown env id {env!r}: {exc}") from None
            entry = str(spec.entry_point)
            if "tir_envs" not in entry:
                raise ValueError(
                    f"{env!r} is not a TIR env (entry point {entry}); agents need text actions, "
                    "text observations and per-turn rewards, e.g. 'TIR-Math-v0'"
                )
            return
        if not isinstance(env, gymnasium.vector.VectorEnv):
            raise TypeError(
                f"env must be an env id or a gymnasium.vector.VectorEnv, got {type(env).__name__}"
            )
        if not isinstance(env.single_action_space, gymnasium.spaces.Text):
            raise ValueError(
                "env is not a TIR env: its action space is "
                f"{env.single_action_space}, not text"
            )

    @property
    def batch_size(self) -> int:
        """Trajectories this rank rolls out per iteration (its share of the batch)."""
        return self.config.prompts_per_iteration // self.ranks.world * self.config.group_size

    def vec_env(self) -> gymnasium.vector.VectorEnv:
        """The vector env the agent rolls out in (built on first use from the env id)."""
        if self._vec_env is None:
            if isinstance(self._env, str):
                self._vec_env, self._sandbox = make_vec_env(
                    self._env, self.batch_size, self.tokenizer, self.rollout, self.env_kwargs
                )
            else:
                self._vec_env = self._env
            if self._vec_env.num_envs != self.batch_size:
                raise ValueError(
                    f"the vector env has {self._vec_env.num_envs} envs, but prompts_per_iteration "
                    f"x group_size / processes = {self.batch_size}"
                )
        return self._vec_env

    def problem_source(self):
        """The env's problem source: ``get(id)`` and ``sample(np_random)``."""
        return problem_source(self.vec_env())

    def sample_problems(self, iteration: int) -> list[str]:
        """This rank's prompts of ``iteration``: its contiguous share of one list that every rank
        draws alike from ``(seed, iteration)``, so ranks hold distinct groups and a resumed run
        draws what the uninterrupted one did."""
        rng = np.random.default_rng([self.config.seed, iteration])
        source = self.problem_source()
        drawn = [source.sample(rng).id for _ in range(self.config.prompts_per_iteration)]
        share = len(drawn) // self.ranks.world
        return drawn[self.ranks.rank * share : (self.ranks.rank + 1) * share]

    def sampling_params(self, seed: int | None) -> SamplingParams:
        r = self.rollout
        return SamplingParams(
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            stop=r.stop,
            seed=seed,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, problem_ids: list[str] | None = None, *, n: int = 32, samples: int = 1,
        temperature: float = 0.0, k: int | None = None,
    ) -> dict[str, float]:
        """pass@1 (and pass@k), turns, tool-call and code-error rates on held-out problems."""
        problem_ids = problem_ids or heldout_problems(self.problem_source(), n)
        params = dataclasses.replace(
            self.sampling_params(self.config.seed), temperature=temperature
        )
        records = evaluate_problems(
            self.vec_env(), self.generator, self.tokenizer, problem_ids, params,
            samples=samples, max_total_tokens=self.rollout.max_total_tokens,
        )
        return summarize(records, k)

    # ------------------------------------------------------------------ training

    def learn(self, iterations: int, *, save_every: int = 1, progress: bool = True) -> Agent:
        """Train until ``self.iteration == iterations`` (a resumed agent continues where it was)."""
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.ranks.check_same_weights(self.trainable)
        progress = progress and self.ranks.is_main
        bar = tqdm(
            total=iterations, initial=self.iteration, desc=f"{self.name} iterations",
            disable=not progress, unit="it",
        )
        try:
            while self.iteration < iterations:
                metrics = self.train_iteration(progress=progress)
                if not self.ranks.is_main:
                    continue
                self.log(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                if self.run_dir is not None and (
                    self.iteration % save_every == 0 or self.iteration == iterations
                ):
                    self.save_checkpoint()
        finally:
            bar.close()
        return self

    def train_iteration(self, progress: bool = False) -> dict[str, float]:
        """One collect -> shape -> advantages -> update pass; returns its metrics."""
        it = self.iteration
        rank = [self.ranks.rank] if self.ranks.world > 1 else []
        seed = int(np.random.default_rng([self.config.seed, it, 1, *rank]).integers(2**31))
        self._seed_everything(seed)
        timings: dict[str, float] = {}

        start = time.perf_counter()
        problems = self.sample_problems(it)
        trajectories = collect(
            self.vec_env(), self.generator, self.tokenizer, problems, self.config.group_size,
            self.sampling_params(seed), max_total_tokens=self.rollout.max_total_tokens,
            progress=progress,
        )
        timings["time/rollout_s"] = time.perf_counter() - start

        start = time.perf_counter()
        tokens, spans = TokenBatch.build(trajectories, self.pad_id)
        batch = rollout_batch(trajectories, spans, tokens.input_ids.shape[1])
        if self.config.shaping:
            batch = shape_rewards(
                batch, [t.code for t in trajectories], alpha=self.config.shaping_alpha,
                similarity=self.config.similarity,
            )
        values = self.rollout_values(tokens, batch)
        advantages = self.estimator(batch, self.config, values)
        timings["time/advantage_s"] = time.perf_counter() - start
        signal = advantage_metrics(trajectories, batch, advantages.tokens)

        start = time.perf_counter()
        update = self.update(tokens, batch, advantages, values, progress=progress)
        timings["time/update_s"] = time.perf_counter() - start
        self.generator.update_weights(self.policy)
        self.iteration = it + 1

        metrics = self.ranks.reduce_metrics({
            **trajectory_metrics(trajectories),
            **signal,
            **update,
            **timings,
            "tokens/generated": sum(t.num_generated for t in trajectories),
        })
        updated_tokens = metrics["tokens/updated"]
        return {
            "iteration": self.iteration,
            **metrics,
            "tokens/rollout_per_s": metrics["tokens/generated"] / max(metrics["time/rollout_s"],
                                                                      1e-9),
            "tokens/update_per_s": (
                updated_tokens / metrics["time/update_s"] if updated_tokens else 0.0
            ),
        }

    @torch.no_grad()
    def rollout_values(self, tokens: TokenBatch, batch: RolloutBatch) -> Tensor | None:
        """Critic values at rollout time, for agents that have one (PPO)."""
        return None

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _make_reference(self):
        reference = copy.deepcopy(self.policy).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        return reference

    def update(
        self, tokens: TokenBatch, batch: RolloutBatch, advantages, values: Tensor | None,
        progress: bool = False,
    ) -> dict[str, float]:
        """``update_epochs`` passes of minibatch steps; returns the mean of each metric.

        Each epoch splits a shuffle of the rows that reach the loss into ``ceil(B /
        minibatch_size)`` minibatches, one optimizer step each, so methods and filter settings
        get the same number of steps (a minibatch that carries no gradient is skipped). The
        metrics include where the time went (forward + backward, optimizer) and what the forward
        passes ran over, so a benchmark reads them instead of wrapping methods.

        Across ranks B and ``minibatch_size`` count every rank's rows, and each rank shuffles and
        splits its own; :meth:`_agreed_plan` makes the ranks agree on each step, so with one
        minibatch per epoch N ranks holding B/N rows each take the update one process takes
        with all B (with several, each step draws its rows per rank instead of from the whole
        batch).
        """
        cfg = self.config
        n = tokens.input_ids.shape[0]
        in_loss = loss_rows(batch, advantages.tokens, cfg)
        loss_mask = batch.loss_mask & in_loss[:, None]
        data = {
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "old_logprobs": tokens.old_logprobs,
            "advantages": advantages.tokens.float(),
            "loss_mask": loss_mask,
        }
        if values is not None:
            data["old_values"] = values
            data["returns"] = advantages.returns.float()
        # A row whose advantages are all 0 adds nothing to the policy gradient; unless a KL,
        # entropy or value term reads it, it can be left out of the forward pass (it still counts
        # in the loss normaliser, so the gradient is unchanged).
        skip_flat = (cfg.skip_flat_rows and values is None and cfg.kl_coef == 0
                     and cfg.entropy_coef == 0)
        has_signal = (data["advantages"] != 0).any(1)
        sums: dict[str, float] = defaultdict(float)
        work = dict.fromkeys(("time/forward_backward_s", "time/optimizer_s", "update/micro_steps",
                              "update/rows_forward", "tokens/forward", "tokens/forward_padded"), 0.0)
        steps, updated_tokens = 0, 0.0
        generator = torch.Generator().manual_seed(cfg.seed + self.iteration)
        micro = cfg.minibatch_size // (cfg.grad_accum_steps * self.ranks.world)
        per_epoch = -(-n * self.ranks.world // cfg.minibatch_size)
        kept = in_loss.nonzero().squeeze(1)
        bar = tqdm(total=cfg.update_epochs * per_epoch, desc="update", leave=False,
                   disable=not progress)
        self.trainable.train()
        for _ in range(cfg.update_epochs):
            order = kept[torch.randperm(len(kept), generator=generator)]
            split = order.tensor_split(per_epoch)
            totals = [aggregation_total(loss_mask[rows], cfg.loss_aggregation) for rows in split]
            minibatches = [rows[has_signal[rows]] if skip_flat else rows for rows in split]
            for rows, denominator, micro_steps in self._agreed_plan(
                    minibatches, totals, loss_mask, micro):
                if micro_steps == 0:
                    bar.update(1)
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                updated_tokens += float(loss_mask[rows].sum())
                for m in range(micro_steps):
                    part = rows[m * micro : (m + 1) * micro]
                    idle = len(part) == 0  # the other ranks still have rows: join their
                    if idle:               # all-reduce with a zero gradient from one row
                        part = torch.zeros(1, dtype=torch.long)
                    width = int(tokens.attention_mask[part].sum(1).max())
                    mb = {k: v[part, :width].to(self.device) for k, v in data.items()}
                    if idle:
                        mb["loss_mask"] = torch.zeros_like(mb["loss_mask"])
                    start = time.perf_counter()
                    with self.ranks.no_sync(self.parallel_model, skip=m < micro_steps - 1):
                        metrics = self._micro_step(mb, denominator)
                    work["time/forward_backward_s"] += time.perf_counter() - start
                    work["update/micro_steps"] += 1
                    if idle:
                        continue
                    for key, value in metrics.items():
                        sums[key] += value * len(part) / len(rows)
                    work["update/rows_forward"] += len(part)
                    work["tokens/forward"] += float(mb["attention_mask"].sum())
                    work["tokens/forward_padded"] += mb["attention_mask"].numel()
                start = time.perf_counter()
                grad_norm = self.ranks.clip_grad_norm_(self.parallel_model, cfg.max_grad_norm)
                sums["lr"] += self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                work["time/optimizer_s"] += time.perf_counter() - start
                sums["grad_norm"] += float(grad_norm)
                steps += 1
                bar.update(1)
        bar.close()
        self.trainable.eval()
        means = {key: value / max(steps, 1) for key, value in sums.items()}
        return {**means, **work, "update/steps": steps,
                "update/rows_in_loss": float(in_loss.sum()),
                "update/rows_with_signal": float((has_signal & in_loss).sum()),
                "tokens/updated": updated_tokens}

    def _agreed_plan(
        self, minibatches: list[Tensor], totals: list[Tensor], loss_mask: Tensor, micro: int
    ) -> list[tuple[Tensor, float, int]]:
        """Per minibatch of one epoch: the rows this rank runs forward, the loss divisor and the
        number of micro-steps, the same on every rank (one gather per epoch).

        The divisor is the minibatch's ``aggregation_total`` summed over ranks (what one process
        holding every row would divide by), over the number of ranks, since DDP averages the
        ranks' gradients. A step is taken when any rank has a token to train on, and then every
        rank runs as many micro-steps as the busiest one (an idle rank's add zero gradient), so
        no rank skips a backward pass whose all-reduce the others wait in.
        """
        local = torch.tensor([[float(total), float(loss_mask[rows].sum()),
                               -(-len(rows) // micro)]
                              for rows, total in zip(minibatches, totals)], dtype=torch.float64)
        everyone = self.ranks.gather(local)  # [ranks, minibatches, 3]
        plan = []
        for rows, total, tokens, micro_steps in zip(
                minibatches, everyone[..., 0].sum(0), everyone[..., 1].sum(0),
                everyone[..., 2].amax(0)):
            denominator = float(total.clamp(min=1)) / self.ranks.world
            plan.append((rows, denominator, int(micro_steps) if tokens > 0 else 0))
        return plan

    def loss_constant(self) -> float | None:
        """Dr.GRPO's fixed normaliser: the config's, else the episode's generation budget."""
        if self.config.loss_aggregation != "constant":
            return None
        return self.config.loss_constant or self.rollout.max_new_tokens * self.rollout.max_turns

    def _micro_step(self, mb: dict[str, Tensor], denominator: float) -> dict[str, float]:
        cfg = self.config
        mask = mb["loss_mask"]
        logits, values = self.forward(mb["input_ids"], mb["attention_mask"], mask)
        logprobs, entropy = token_logprobs(logits, mb["input_ids"], mask, self.rollout.temperature)
        kept = logits.shape[1]
        del logits  # the [B, K, V] tensor is the largest one alive: free it before the next
        ref_logprobs = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logits = self.reference(
                    input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                    use_cache=False, logits_to_keep=kept,
                ).logits
                ref_logprobs, _ = token_logprobs(
                    ref_logits, mb["input_ids"], mask, self.rollout.temperature
                )
        constant = self.loss_constant()
        out = policy_loss(
            logprobs, mb["old_logprobs"], mb["advantages"], mask,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation,
            constant=constant, denominator=denominator, ref_logprobs=ref_logprobs,
            kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy=entropy,
            entropy_coef=cfg.entropy_coef,
        )
        loss = out.loss
        metrics = {f"loss/{k}": float(v) for k, v in out.metrics.items()}
        extra, extra_metrics = self.extra_loss(values, mb, denominator)
        if extra is not None:
            loss = loss + extra
        metrics.update(extra_metrics)
        loss.backward()
        metrics["loss/total"] = float(loss.detach())
        return metrics

    # ------------------------------------------------------------------ logging, saving

    def log(self, metrics: dict[str, float]) -> None:
        logger.info(
            "iteration %d: reward %.3f accuracy %.3f turns %.2f",
            metrics["iteration"], metrics["reward/mean"], metrics["accuracy"], metrics["turns/mean"],
        )
        if self.run_dir is not None:
            if self._metrics is None:  # drop lines a killed run logged past its last checkpoint
                self._metrics = MetricsLogger(self.run_dir, truncate_after=metrics["iteration"] - 1)
            self._metrics.log(metrics, step=int(metrics["iteration"]))

    def save_checkpoint(self) -> Path:
        """An atomic checkpoint of everything a resumed run needs, under ``run_dir``."""
        if self.run_dir is None:
            raise ValueError("this agent has no run_dir to save checkpoints in")
        return save_checkpoint(
            self.run_dir, self.iteration, self.trainable, self.tokenizer,
            trainer_state={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "iteration": self.iteration,
                "algo": self.name,
                "config": self.config.to_dict(),
                "rollout": dataclasses.asdict(self.rollout),
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                },
            },
        )

    def save(self, path: str | os.PathLike) -> Path:
        """The trained model as an HF directory (plus the value head for PPO)."""
        path = Path(path)
        self.trainable.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def resume(self, checkpoint: str | os.PathLike | None = None) -> bool:
        """Load the latest (or the given) checkpoint of ``run_dir``; False when there is none."""
        path = Path(checkpoint) if checkpoint else (
            latest_checkpoint(self.run_dir) if self.run_dir else None
        )
        if path is None:
            return False
        state = load_trainer_state(path)
        self.load_weights(path / "model")
        self.generator.update_weights(self.policy)  # a server holds its own copy
        if state["algo"] != self.name:
            raise ValueError(f"checkpoint {path} was written by {state['algo']}, not {self.name}")
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints written before the warm-up schedule existed
            self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        logger.info("resumed %s from %s at iteration %d", self.name, path, self.iteration)
        return True

    def load_weights(self, model_dir: Path) -> None:
        """Copy the weights saved in ``model_dir`` into the live model (optimizer keeps its refs)."""
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.policy.dtype)
        self.policy.load_state_dict(saved.state_dict())

    def close(self) -> None:
        if self._vec_env is not None and isinstance(self._env, str):
            self._vec_env.close()
        if self._sandbox is not None:
            self._sandbox.close()
        if self._metrics is not None:
            self._metrics.close()
        self._vec_env = self._sandbox = self._metrics = None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
