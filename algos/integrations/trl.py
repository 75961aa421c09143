"""TRL adapter: multi-turn TIR episodes and GTPO advantages inside TRL's ``GRPOTrainer``.

Tested with ``trl==1.16.0`` (``pip install tir-gym[trl]``)::

    from trl import GRPOConfig
    from algos.integrations.trl import GTPOTrainer, TIRRollout, problem_dataset, tir_reward

    rollout = TIRRollout("TIR-Math-v0", tokenizer, RolloutConfig(max_new_tokens=256, max_turns=4))
    trainer = GTPOTrainer(model=model, processing_class=tokenizer, reward_funcs=tir_reward,
                          args=GRPOConfig(num_generations=4, ...), rollout_func=rollout,
                          train_dataset=problem_dataset("TIR-Math-v0", 512))
    trainer.train()

How the pieces map onto TRL's hooks:

- The dataset's ``prompt`` column holds **problem ids** of the env's problem source
  (:func:`problem_dataset` builds one); the env renders the actual prompt.
- :class:`TIRRollout` is a ``rollout_func``: for each prompt it plays one episode through our
  vector env and sandbox with :func:`algos.rollout.collect` (token in, token out). TRL's
  "completion" is the whole episode after the prompt: turn 1's generated ids, the tool output
  ids, turn 2's generated ids, ... ``env_mask`` is 0 on tool-output tokens (and on every token of
  a trajectory whose sandbox failed), so TRL's loss sees only generated tokens. Turn rewards,
  their ``accuracy``/``format`` components, each turn's token span in the completion, the code
  and the infra-error flag travel as extra fields, which TRL hands to reward functions.
- :func:`tir_reward` is a reward function: the sum of the episode's turn rewards (``None``, i.e.
  unscorable, for infra errors). With plain ``GRPOTrainer`` that is GRPO on the env's reward.
- :class:`GTPOTrainer` replaces TRL's ``[B]`` advantages with GTPO's per-token ``[B, C]``
  advantages, computed by our registered estimator (``algos.advantages``, after GTPO's
  code-similarity shaping when the config asks for it) from the extra fields. TRL's loss accepts
  ``[B, C]`` advantages as they are.

The trainer's own generation settings apply where TRL's loss depends on them: sampling uses
``args.temperature`` and ``args.top_p`` (the loss recomputes logprobs at that temperature). Per-turn
token budget, turns per episode, the episode budget and the stop strings come from the
``RolloutConfig``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from trl import GRPOTrainer

from algos.advantages import check_config, get_advantage
from algos.batch import RolloutBatch
from algos.config import AlgoConfig, GTPOConfig
from algos.generation import make_generator
from algos.generation.base import Generator, SamplingParams
from algos.generation.hf import HFGenerator
from algos.rollout import RolloutConfig, Trajectory, collect, make_vec_env
from algos.shaping import shape_rewards

__all__ = ["GTPOTrainer", "TIRRollout", "episode_fields", "problem_dataset", "tir_reward"]

EXTRA_FIELDS = ("turn_rewards", "turn_accuracy", "turn_format", "turn_spans", "infra_error",
                "correct", "code")
"""The per-episode fields :class:`TIRRollout` adds beside TRL's required ones (and ``env_mask``)."""


def problem_dataset(env_id: str = "TIR-Math-v0", n: int = 256, seed: int = 0,
                    **env_kwargs: Any):
    """A ``datasets.Dataset`` whose ``prompt`` column holds ``n`` problem ids of ``env_id``.

    Procedural problems are drawn with ``seed``; a finite source (a benchmark, a file) gives its
    first ``n`` problems in order. TRL's sampler repeats each row ``num_generations`` times.
    """
    from datasets import Dataset

    from tir_envs.integrations import problem_ids

    return Dataset.from_dict({"prompt": problem_ids(env_id, n, seed, **env_kwargs)})


def episode_fields(trajectory: Trajectory) -> dict[str, Any]:
    """One episode as TRL rollout fields: completion ids, logprobs, ``env_mask``, turn records.

    ``turn_spans[j]`` is the half-open range of turn j's generated tokens in ``completion_ids``.
    Tool-output tokens get logprob 0.0 (they were not sampled; the mask hides them).
    """
    completion, logprobs, mask, spans = [], [], [], []
    for turn in trajectory.turns:
        start = len(completion)
        completion += turn.generated_ids + turn.env_ids
        logprobs += list(turn.logprobs) + [0.0] * len(turn.env_ids)
        mask += [1] * len(turn.generated_ids) + [0] * len(turn.env_ids)
        spans.append((start, start + len(turn.generated_ids)))
    if trajectory.infra_error:
        mask = [0] * len(mask)  # the sandbox failed, not the model: no token of it is trained on

    def component(name: str) -> list[float]:
        return [float(t.info.get("reward_components", {}).get(name, 0.0)) for t in trajectory.turns]

    return {
        "prompt_ids": list(trajectory.prompt_ids),
        "completion_ids": completion,
        "logprobs": logprobs,
        "env_mask": mask,
        "turn_rewards": trajectory.rewards,
        "turn_accuracy": component("accuracy"),
        "turn_format": component("format"),
        "turn_spans": spans,
        "infra_error": trajectory.infra_error,
        "correct": trajectory.correct,
        "code": trajectory.code,
    }


class TIRRollout:
    """A TRL ``rollout_func``: one multi-turn TIR episode per prompt (a problem id).

    ``env_id``/``env_kwargs`` make the envs (one vector env of as many envs as a call has prompts,
    sharing one sandbox); ``generator`` samples turns (default: our HF backend on the trainer's
    model, which is the model TRL updates, so no weight sync is needed). Call :meth:`close` (or
    use it as a context manager) to stop the sandbox.
    """

    def __init__(self, env_id: str = "TIR-Math-v0", tokenizer=None,
                 rollout: RolloutConfig | None = None, *,
                 env_kwargs: dict[str, Any] | None = None, generator: Generator | None = None,
                 seed: int | None = None):
        self.env_id = env_id
        self.tokenizer = tokenizer
        self.rollout = rollout or RolloutConfig()
        self.env_kwargs = dict(env_kwargs or {})
        self.generator = generator
        self.seed = seed
        self._calls = 0
        self._vec_env = self._sandbox = None
        self._finalizer: weakref.finalize | None = None

    def __call__(self, prompts: Sequence[Any], trainer: GRPOTrainer) -> dict[str, list]:
        problem_ids = [_problem_id(p) for p in prompts]
        tokenizer = self.tokenizer or trainer.processing_class
        generator = self.generator or self._trainer_generator(trainer, tokenizer)
        vec_env = self._envs(len(problem_ids), tokenizer)
        sampling = SamplingParams(
            max_new_tokens=self.rollout.max_new_tokens,
            temperature=float(trainer.args.temperature),
            top_p=float(trainer.args.top_p),
            stop=self.rollout.stop,
            seed=None if self.seed is None else self.seed + self._calls,
        )
        self._calls += 1
        # Every prompt is its own "group" here: TRL already repeated each problem
        # num_generations times, and it (or GTPOTrainer) forms the groups from the rows.
        trajectories = collect(vec_env, generator, tokenizer, problem_ids, 1, sampling,
                               max_total_tokens=self.rollout.max_total_tokens)
        rows = [episode_fields(t) for t in trajectories]
        return {key: [row[key] for row in rows] for key in rows[0]}

    def _trainer_generator(self, trainer: GRPOTrainer, tokenizer) -> Generator:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if not isinstance(self.generator, HFGenerator) or self.generator.model is not model:
            self.generator = make_generator("hf", model=model, tokenizer=tokenizer)
        return self.generator

    def _envs(self, n: int, tokenizer):
        if self._vec_env is not None and self._vec_env.num_envs != n:
            self.close()
        if self._vec_env is None:
            self._vec_env, self._sandbox = make_vec_env(
                self.env_id, n, tokenizer, self.rollout, self.env_kwargs)
            self._finalizer = weakref.finalize(self, _close, self._vec_env, self._sandbox)
        return self._vec_env

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._vec_env = self._sandbox = self._finalizer = None

    def __enter__(self) -> TIRRollout:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(vec_env, sandbox) -> None:
    vec_env.close()
    sandbox.close()


def _problem_id(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    raise TypeError(
        "TIRRollout expects each dataset prompt to be a problem id (str), as problem_dataset() "
        f"builds; got {type(prompt).__name__}. The env renders the prompt text itself."
    )


def tir_reward(completions, turn_rewards, infra_error, **kwargs) -> list[float | None]:
    """TRL reward function: an episode's summed turn rewards (``None`` when the sandbox failed,
    which TRL treats as unscorable: no reward, advantage 0)."""
    return [None if bad else float(sum(r)) for r, bad in zip(turn_rewards, infra_error)]


def rollout_batch(rows: Sequence[dict[str, Any]], group_size: int) -> RolloutBatch:
    """The turn-level ``RolloutBatch`` of TRL rows carrying :class:`TIRRollout`'s fields; rows
    ``[k * group_size, (k + 1) * group_size)`` form group k, as in TRL's sampler."""
    return RolloutBatch.build(
        group_ids=[i // group_size for i in range(len(rows))],
        turn_rewards=[r["turn_rewards"] for r in rows],
        turn_spans=[[tuple(s) for s in r["turn_spans"]] for r in rows],
        infra_error=[bool(r["infra_error"]) for r in rows],
        correct=[bool(r["correct"]) for r in rows],
        turn_accuracy=[r["turn_accuracy"] for r in rows],
        turn_format=[r["turn_format"] for r in rows],
    )


def token_advantages(rows: Sequence[dict[str, Any]], group_size: int,
                     config: AlgoConfig) -> torch.Tensor:
    """``[N, L]`` advantages of the episodes in ``rows`` by ``config``'s registered estimator
    (GTPO by default), after GTPO's shaping when ``config.shaping`` is on."""
    batch = rollout_batch(rows, group_size)
    if getattr(config, "shaping", False):
        batch = shape_rewards(batch, [r["code"] for r in rows], alpha=config.shaping_alpha,
                              similarity=config.similarity)
    return get_advantage(config.advantage)(batch, config, None).tokens


class GTPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with GTPO's per-token advantages.

    Same arguments as ``GRPOTrainer`` (``rollout_func`` must be a :class:`TIRRollout` or produce
    its fields), plus ``gtpo``: an ``algos.config.GTPOConfig`` of which only the advantage fields
    are read (``advantage``, ``turn_rewards``, ``trajectory_reward``, ``gamma``, ``norm_scope``,
    ``adv_eps``, ``shaping``, ``shaping_alpha``, ``similarity``); TRL's ``args`` drive the rest.
    Any registered estimator without a critic works (``GRPOConfig()`` gives our multi-turn GRPO).

    Groups span processes in TRL, so each process gathers every row's turn records, computes the
    advantages of the whole generation batch and keeps its own rows.
    """

    def __init__(self, *args, gtpo: AlgoConfig | None = None, **kwargs):
        if kwargs.get("rollout_func") is None:
            raise ValueError("GTPOTrainer needs rollout_func=TIRRollout(...) (turn records)")
        super().__init__(*args, **kwargs)
        self.gtpo = gtpo or GTPOConfig()
        check_config(self.gtpo)
        if self.gtpo.advantage == "gae":
            raise ValueError("GTPOTrainer has no critic; pick a critic-free estimator")

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        # TRL merged the rollout's extra fields into `inputs`, one row per completion.
        from accelerate.utils import gather_object

        rows = [{key: row[key] for key in EXTRA_FIELDS} for row in inputs]
        all_rows = gather_object(rows) if self.accelerator.num_processes > 1 else rows
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        tokens = token_advantages(all_rows, group_size, self.gtpo)
        start = self.accelerator.process_index * len(rows)
        local = tokens[start : start + len(rows)]
        width = output["completion_ids"].shape[1]
        advantages = torch.zeros((len(rows), width), dtype=torch.float32)
        keep = min(width, local.shape[1])
        advantages[:, :keep] = local[:, :keep]
        output["advantages"] = advantages.to(output["completion_ids"].device)
        return output
