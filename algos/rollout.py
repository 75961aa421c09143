"""Multi-turn rollouts over Gymnasium vector envs, token in / token out.

One vector env holds ``P * G`` TIR envs: G copies of each of P prompts (a GRPO group), pinned with
``reset(options={"problem_id": ...})``. An env's whole episode is a single assistant message that
the model keeps extending:

    prompt ids | turn 1 generated ids | turn 1 env ids (tool output) | turn 2 generated ids | ...

The generated ids are kept exactly as sampled, with their sampling logprobs; only the text the env
adds (the formatted tool output) is tokenized. Nothing is ever decoded and re-tokenized for training.

Episodes advance independently: the sub-envs step one at a time through an env pool
(``algos.envpool``), and each turn goes to the generator as soon as its episode's observation is
back (``EpisodeScheduler``). A backend that batches across calls (``Generator.concurrency > 1``:
transformers' continuous batching, a server) gets one call per turn the moment it is ready; a
backend that batches within a call gets every live episode's turn in one call, once the env
steps in flight are back (the batches lockstep makes). A vector env without
sub-envs to step alone (``AsyncVectorEnv``) runs in lockstep instead (``collect_lockstep``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from algos.envpool import env_pool
from algos.generation.base import Completion, GenerationError, Generator, SamplingParams

logger = logging.getLogger(__name__)

CLOSING_FENCE = "```\n"
"""Generation stops here: the end of a python block is where the env must run it."""


@dataclass
class RolloutConfig:
    """How episodes are sampled; shared by training and evaluation."""

    max_new_tokens: int = 256
    """Token budget of one turn; a turn cut here usually leaves an unclosed fence (a format penalty)."""
    max_turns: int = 4
    """Turns per episode before the env truncates it (the env's ``max_turns``)."""
    max_total_tokens: int = 2048
    """Budget of a whole episode (prompt, turns and tool output); past it the episode ends as
    ``context``, so sequences stay within the model's window and memory."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's logprobs use the same one, so ratios start at 1."""
    top_p: float = 1.0
    """Nucleus sampling. Below 1 the sampling logprobs no longer match the policy's (see
    ``algos.generation.base``), which biases the importance ratio."""
    stop: tuple[str, ...] = (CLOSING_FENCE,)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.max_turns < 1:
            raise ValueError("max_new_tokens and max_turns must be >= 1")
        if self.max_total_tokens <= self.max_new_tokens:
            raise ValueError(
                f"max_total_tokens ({self.max_total_tokens}) must exceed max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        self.stop = tuple(self.stop)


INCOMPLETE_CODE = ("unclosed_fence", "empty_code", "action_too_long")
"""``info["format_error"]`` values of a turn whose code block is not a complete one."""


@dataclass
class Turn:
    """One assistant turn and what the env answered."""

    generated_ids: list[int]
    logprobs: list[float]
    """Sampling logprob of each generated id, under the distribution it was sampled from."""
    env_ids: list[int]
    """Tokens the env appended after this turn (tool output); empty on the final turn."""
    reward: float
    info: dict[str, Any]
    finish_reason: str

    @property
    def void(self) -> bool:
        """Neither a complete code block nor a final answer (SimpleTIR's void turn): a turn cut
        off mid-fence, an empty or overlong one, or a final turn with no ``\\boxed{}``."""
        complete_code = (self.info.get("tool_called", False)
                         and self.info.get("format_error") not in INCOMPLETE_CODE)
        return not complete_code and self.info.get("final_answer") is None


@dataclass
class Trajectory:
    """One episode: the prompt, its turns, and where it sits in the batch."""

    prompt_ids: list[int]
    group_id: int
    problem_id: str
    turns: list[Turn] = field(default_factory=list)
    done_reason: str = "running"
    """``terminated`` (final answer), ``truncated`` (max turns), ``context`` (token budget hit) or
    ``infra_error`` (the generation backend failed)."""

    @property
    def token_ids(self) -> list[int]:
        ids = list(self.prompt_ids)
        for turn in self.turns:
            ids += turn.generated_ids + turn.env_ids
        return ids

    @property
    def rewards(self) -> list[float]:
        return [turn.reward for turn in self.turns]

    @property
    def correct(self) -> bool:
        return bool(self.turns) and bool(self.turns[-1].info.get("correct"))

    @property
    def infra_error(self) -> bool:
        """The sandbox or the generation backend failed: not the model's fault, so not scored."""
        return self.done_reason == "infra_error" or any(t.info.get("exec", {}).get("status") == "infra_error" for t in self.turns)

    @property
    def has_void_turn(self) -> bool:
        return any(turn.void for turn in self.turns)

    @property
    def code(self) -> str:
        """All code the trajectory ran, concatenated (what GTPO's shaping compares)."""
        return "\n".join(t.info.get("code") or "" for t in self.turns)

    @property
    def num_generated(self) -> int:
        return sum(len(t.generated_ids) for t in self.turns)


def make_vec_env(
    env_id: str, num_envs: int, tokenizer, rollout: RolloutConfig,
    env_kwargs: dict[str, Any] | None = None,
):
    """A vector env of ``num_envs`` copies of ``env_id``.

    Envs render prompts with ``tokenizer``'s chat template and end episodes after
    ``rollout.max_turns`` turns. ``env_kwargs`` are ``gymnasium.make`` arguments plus
    ``sandbox_backend``/``sandbox_kwargs`` and ``env_workers``: ``"sync"`` (default) steps the
    envs in this process, all sharing one sandbox; ``"ray"`` puts them in Ray actors, each with
    its own sandbox (``tir_envs.integrations.ray.RayVectorEnv``; ``ray_options`` are its keyword
    arguments, e.g. ``{"envs_per_actor": 4, "ray_init": {"address": "auto"}}``). Returns
    ``(vec_env, sandbox)`` (``sandbox`` is ``None`` under Ray); the caller closes both.
    """
    import gymnasium

    from tir_envs.sandbox import make_sandbox

    kwargs = dict(env_kwargs or {})
    workers = kwargs.pop("env_workers", "sync")
    ray_options = kwargs.pop("ray_options", {})
    backend, sandbox_kwargs = kwargs.pop("sandbox_backend", "local"), kwargs.pop("sandbox_kwargs", {})
    kwargs = {"tokenizer": tokenizer, "max_turns": rollout.max_turns,
              "max_episode_steps": rollout.max_turns, **kwargs}
    if workers == "ray":
        from tir_envs.integrations.ray import RayVectorEnv

        return RayVectorEnv(env_id, num_envs, sandbox_backend=backend,
                            sandbox_kwargs=sandbox_kwargs, **ray_options, **kwargs), None
    if workers != "sync":
        raise ValueError(f"env_workers must be 'sync' or 'ray', got {workers!r}")
    sandbox = make_sandbox(backend, **sandbox_kwargs)
    kwargs = {"sandbox": sandbox, **kwargs}
    try:
        vec_env = gymnasium.vector.SyncVectorEnv(
            [lambda: gymnasium.make(env_id, **kwargs)] * num_envs
        )
    except BaseException:
        sandbox.close()
        raise
    return vec_env, sandbox


def unbatch_info(infos: dict[str, Any], index: int) -> dict[str, Any]:
    """Pick env ``index``'s entries out of a vector env's batched info dict."""
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            out[key] = unbatch_info(value, index)
        elif infos.get(f"_{key}", np.ones(index + 1, bool))[index]:
            item = value[index]
            out[key] = item.item() if isinstance(item, np.generic) else item
    return out


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a reset observation.

    An env made with ``tokenizer=`` renders its prompt through the chat template, so the text
    already carries the template's special tokens and opens the assistant message; a plain-text
    prompt gets the tokenizer's own special tokens (e.g. BOS).
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(prompt, add_special_tokens=not templated)["input_ids"]


def collect(
    vec_env,
    generator: Generator,
    tokenizer,
    problem_ids: list[str],
    group_size: int,
    sampling: SamplingParams,
    max_total_tokens: int = 2048,
    progress: bool = False,
) -> list[Trajectory]:
    """Roll out ``group_size`` episodes of each problem: ``len(problem_ids) * group_size`` records.

    Envs ``[k * group_size, (k + 1) * group_size)`` form group ``k`` on ``problem_ids[k]``; a vector
    env with more envs than that leaves the rest idle. Episodes advance independently
    (``EpisodeScheduler``) when the vector env offers an env pool, in lockstep otherwise.
    """
    _check_envs(vec_env, problem_ids, group_size)
    with env_pool(vec_env) as pool:
        if pool is None:
            return collect_lockstep(vec_env, generator, tokenizer, problem_ids, group_size,
                                    sampling, max_total_tokens, progress)
        trajectories = start_episodes(pool, tokenizer, problem_ids, group_size)
        scheduler = EpisodeScheduler(pool, generator, tokenizer, sampling, max_total_tokens)
        scheduler.run(trajectories, progress=progress)
    return trajectories


def start_episodes(pool, tokenizer, problem_ids: list[str], group_size: int) -> list[Trajectory]:
    """Reset the pool's envs ``[0, len(problem_ids) * group_size)``, ``group_size`` per problem."""
    trajectories = []
    for i in range(len(problem_ids) * group_size):
        problem_id = problem_ids[i // group_size]
        obs, _ = pool.reset(i, options={"problem_id": problem_id})
        trajectories.append(Trajectory(prompt_ids=prompt_token_ids(tokenizer, obs),
                                       group_id=i // group_size, problem_id=problem_id))
    return trajectories


def _check_envs(vec_env, problem_ids: list[str], group_size: int) -> None:
    needed = len(problem_ids) * group_size
    if not problem_ids or needed > vec_env.num_envs:
        raise ValueError(
            f"{len(problem_ids)} prompts x {group_size} samples need {needed} envs; "
            f"the vector env has {vec_env.num_envs}"
        )


class EpisodeScheduler:
    """Runs episodes through an env pool; episode ``i`` lives in the pool's env ``i``.

    Each turn is sent to the generator as soon as its episode's observation is back, and each
    generated turn goes to its env at once, so generation of some episodes overlaps env steps and
    later turns of others. How turns are grouped into ``generate`` calls follows the backend:

    - ``generator.concurrency > 1`` (it batches across calls): one call per turn, up to that many
      calls at once, so its own scheduler sees every live episode;
    - otherwise one call holds every pending turn, and it waits for the env steps still running:
      each call then holds every live episode's turn, the batches lockstep makes, so a seeded
      rollout samples the same episodes whatever the machine's load. ``batch_wait_s`` bounds that
      wait instead (a slow tool call then holds back no other episode, but which turns share a
      call, and so what a seeded call samples, depends on timing).

    ``events`` records the schedule: ``("send", episode, turn)`` when a turn goes to the generator,
    ``("generated", episode, turn)`` when it comes back, ``("stepped", episode, turn)`` when the env
    answered it.
    """

    def __init__(self, pool, generator: Generator, tokenizer, sampling: SamplingParams,
                 max_total_tokens: int, batch_wait_s: float | None = None):
        self.pool = pool
        self.generator = generator
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.max_total_tokens = max_total_tokens
        self.batch_wait_s = batch_wait_s
        self.events: list[tuple[str, int, int]] = []

    def run(self, trajectories: list[Trajectory], progress: bool = False) -> None:
        """Play every trajectory's episode to its end, appending its turns in place."""
        concurrency = max(1, int(getattr(self.generator, "concurrency", 1)))
        self._trajectories = trajectories
        self._contexts = [list(t.prompt_ids) for t in trajectories]
        self._ready: dict[int, float] = {i: time.perf_counter() for i in range(len(trajectories))}
        self._calls: dict[Future, list[int]] = {}
        self._steps: dict[Future, tuple[int, Completion]] = {}
        self._bar = tqdm(total=len(trajectories), desc="rollout", unit="episode", leave=False,
                         disable=not progress)
        workers = min(concurrency, len(trajectories))
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate") as calls:
                while self._ready or self._calls or self._steps:
                    timeout = self._send(calls, concurrency)
                    if not (self._calls or self._steps):
                        continue
                    done, _ = wait([*self._calls, *self._steps], timeout=timeout,
                                   return_when=FIRST_COMPLETED)
                    for future in done:
                        if future in self._calls:
                            self._generated(future, self._calls.pop(future))
                        else:
                            self._stepped(future, *self._steps.pop(future))
        finally:
            self._bar.close()

    def _send(self, calls: ThreadPoolExecutor, concurrency: int) -> float | None:
        """Send ready turns to the generator; returns how long to wait before trying again."""
        if concurrency > 1:
            while self._ready and len(self._calls) < concurrency:
                episode = min(self._ready, key=self._ready.get)
                del self._ready[episode]
                self._call(calls, [episode])
            return None
        if not self._ready or self._calls:
            return None
        if self._steps and self.batch_wait_s is None:
            return None
        waited = time.perf_counter() - min(self._ready.values())
        if self._steps and waited < self.batch_wait_s:
            return self.batch_wait_s - waited
        batch = sorted(self._ready)
        self._ready.clear()
        self._call(calls, batch)
        return None

    def _call(self, calls: ThreadPoolExecutor, episodes: list[int]) -> None:
        for i in episodes:
            self.events.append(("send", i, len(self._trajectories[i].turns)))
        future = calls.submit(self.generator.generate, [self._contexts[i] for i in episodes],
                              self.sampling)
        self._calls[future] = episodes

    def _generated(self, future: Future, episodes: list[int]) -> None:
        try:
            completions = future.result()
        except GenerationError as exc:
            logger.warning("generation failed for %d episodes, excluded as infra errors: %s",
                           len(episodes), exc)
            for i in episodes:
                self._trajectories[i].done_reason = "infra_error"
            self._bar.update(len(episodes))
            return
        for i, completion in zip(episodes, completions):
            self.events.append(("generated", i, len(self._trajectories[i].turns)))
            self._steps[self.pool.step(i, completion.text)] = (i, completion)

    def _stepped(self, future: Future, i: int, completion: Completion) -> None:
        obs, reward, terminated, truncated, info = future.result()
        trajectory = self._trajectories[i]
        self.events.append(("stepped", i, len(trajectory.turns)))
        env_ids = ([] if terminated or truncated
                   else self.tokenizer(obs, add_special_tokens=False)["input_ids"])
        trajectory.turns.append(Turn(
            generated_ids=list(completion.token_ids),
            logprobs=list(completion.logprobs),
            env_ids=env_ids,
            reward=float(reward),
            info=dict(info),
            finish_reason=completion.finish_reason,
        ))
        self._contexts[i] += completion.token_ids + env_ids
        if _finish(trajectory, bool(terminated), bool(truncated),
                   len(self._contexts[i]) + self.sampling.max_new_tokens > self.max_total_tokens):
            self._bar.update(1)
        else:
            self._ready[i] = time.perf_counter()


def _finish(trajectory: Trajectory, terminated: bool, truncated: bool, over_budget: bool) -> bool:
    """Set why the episode ended after its latest turn; False while it goes on."""
    if terminated:
        trajectory.done_reason = "terminated"
    elif truncated:
        trajectory.done_reason = "truncated"
    elif over_budget:
        trajectory.done_reason = "context"
        # The final tool output is never trained on, so drop it from the record.
        trajectory.turns[-1].env_ids = []
    else:
        return False
    return True


def collect_lockstep(
    vec_env,
    generator: Generator,
    tokenizer,
    problem_ids: list[str],
    group_size: int,
    sampling: SamplingParams,
    max_total_tokens: int = 2048,
    progress: bool = False,
) -> list[Trajectory]:
    """``collect`` through ``vec_env.reset``/``vec_env.step``: every turn round, all unfinished
    episodes generate in one batch, then the vector env steps them together.

    Finished envs still take part in ``vec_env.step`` with an empty action, which under the default
    next-step autoreset merely resets them; envs past ``len(problem_ids) * group_size`` are reset
    too but never generate. Their results are ignored.
    """
    _check_envs(vec_env, problem_ids, group_size)
    needed = len(problem_ids) * group_size
    num_envs = vec_env.num_envs
    observations = [None] * num_envs
    groups = -(-num_envs // group_size)
    for group in range(groups):
        mask = np.zeros(num_envs, dtype=bool)
        mask[group * group_size : (group + 1) * group_size] = True
        problem_id = problem_ids[min(group, len(problem_ids) - 1)]
        obs, _ = vec_env.reset(options={"problem_id": problem_id, "reset_mask": mask})
        for i in np.flatnonzero(mask):
            observations[i] = obs[i]

    trajectories = [
        Trajectory(
            prompt_ids=prompt_token_ids(tokenizer, observations[i]),
            group_id=i // group_size,
            problem_id=problem_ids[i // group_size],
        )
        for i in range(needed)
    ]
    contexts = [list(t.prompt_ids) for t in trajectories]
    active = [True] * needed + [False] * (num_envs - needed)

    bar = tqdm(total=needed, desc="rollout", unit="episode", leave=False, disable=not progress)
    while any(active):
        running = [i for i in range(needed) if active[i]]
        try:
            completions = generator.generate([contexts[i] for i in running], sampling)
        except GenerationError as exc:
            logger.warning("generation failed for %d episodes, excluded as infra errors: %s",
                           len(running), exc)
            for i in running:
                trajectories[i].done_reason = "infra_error"
                active[i] = False
            bar.update(len(running))
            continue
        actions = [""] * num_envs
        for i, completion in zip(running, completions):
            actions[i] = completion.text
        obs, rewards, terminated, truncated, infos = vec_env.step(tuple(actions))
        for i, completion in zip(running, completions):
            trajectory = trajectories[i]
            done = bool(terminated[i] or truncated[i])
            env_ids = [] if done else tokenizer(obs[i], add_special_tokens=False)["input_ids"]
            trajectory.turns.append(
                Turn(
                    generated_ids=list(completion.token_ids),
                    logprobs=list(completion.logprobs),
                    env_ids=env_ids,
                    reward=float(rewards[i]),
                    info=unbatch_info(infos, i),
                    finish_reason=completion.finish_reason,
                )
            )
            contexts[i] += completion.token_ids + env_ids
            if _finish(trajectory, bool(terminated[i]), bool(truncated[i]),
                       len(contexts[i]) + sampling.max_new_tokens > max_total_tokens):
                active[i] = False
                bar.update(1)
    bar.close()
    return trajectories
