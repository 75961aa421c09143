"""Ray env workers: a Gymnasium vector env whose TIR envs live in Ray actors.

Tested with ``ray==2.60.0`` (``pip install tir-gym[ray]``)::

    from tir_envs.integrations.ray import RayVectorEnv

    vec_env = RayVectorEnv("TIR-Math-v0", num_envs=16, envs_per_actor=4,
                           ray_init={"address": "auto"},      # join a running cluster
                           actor_options={"num_cpus": 1},     # any ray.remote option
                           sandbox_backend="docker", max_turns=4, max_episode_steps=4)
    obs, infos = vec_env.reset(seed=0, options={"problem_id": "proc/modpow/1"})
    obs, rewards, terminated, truncated, infos = vec_env.step(actions)

Each actor hosts ``envs_per_actor`` envs (``gymnasium.make(env_id, **env_kwargs)``) and its own
sandbox, made inside the actor with ``make_sandbox(sandbox_backend, **sandbox_kwargs)`` so its
kernels run on the actor's node; heavy tool code thus spreads over the cluster. A vector step
sends every env its action at once: actors step in parallel, and the envs of one actor in
threads (the sandbox runs each cell in its own process). Ray is initialised with ``ray_init``
unless the caller already did it; nodes other than the driver's need ``tir-gym`` installed (or
``ray_init={"runtime_env": {"py_modules": [tir_envs]}}``).

The vector env autoresets like ``SyncVectorEnv`` (next step) and takes the TIR env's reset
options, ``reset_mask`` included, so ``algos.rollout.collect`` and any Gymnasium RL code drive it
unchanged; ``env_pool()`` gives per-episode access for asynchronous rollouts.

A dead actor (its process or its node lost) is replaced by a fresh one at the next call. Each
episode it hosted ends with a truncated step whose ``info["exec"]["status"]`` is
``"infra_error"``, the way the env reports a failed sandbox, so agents exclude the episode
instead of scoring it (``algos.rollout.Trajectory.infra_error``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
import ray
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from ray.exceptions import RayActorError

from tir_envs.sandbox import ExecStatus

logger = logging.getLogger(__name__)

__all__ = ["EnvHost", "RayEnvPool", "RayVectorEnv"]

StepResult = tuple[str, float, bool, bool, dict[str, Any]]


class EnvHost:
    """What one Ray actor runs: ``count`` envs of ``env_id`` sharing the actor's own sandbox."""

    def __init__(self, env_id: str, count: int, env_kwargs: Mapping[str, Any],
                 sandbox_backend: str, sandbox_kwargs: Mapping[str, Any]):
        import tir_envs  # noqa: F401  (registers the env ids in this process)
        from tir_envs.sandbox import make_sandbox

        self.sandbox = make_sandbox(sandbox_backend, **sandbox_kwargs)
        self.envs = [gymnasium.make(env_id, sandbox=self.sandbox, **env_kwargs)
                     for _ in range(count)]

    def spaces(self) -> tuple[gymnasium.Space, gymnasium.Space, dict, str | None]:
        env = self.envs[0]
        return env.observation_space, env.action_space, dict(env.metadata), env.render_mode

    def reset(self, slot: int, seed: int | None, options: dict | None) -> tuple[str, dict]:
        return self.envs[slot].reset(seed=seed, options=options)

    def step(self, slot: int, action: str) -> StepResult:
        return self.envs[slot].step(action)

    def call(self, slot: int, name: str, args: tuple, kwargs: dict) -> Any:
        attr = self.envs[slot].get_wrapper_attr(name)
        return attr(*args, **kwargs) if callable(attr) else attr

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.sandbox.close()


class RayEnvPool:
    """``num_envs`` TIR envs in Ray actors, reset and stepped one episode at a time.

    Actors spread over the cluster's nodes (``scheduling_strategy="SPREAD"``) unless
    ``actor_options`` say otherwise; they reserve no CPU unless given ``num_cpus``.

    ``step(index, action)`` returns a ``concurrent.futures.Future`` of that env's
    ``(obs, reward, terminated, truncated, info)``, so an asynchronous rollout advances each
    episode as soon as its action is ready. Env ``index`` lives in actor
    ``index // envs_per_actor``. Errors of the env itself (a non-``str`` action, a step after
    the episode ended) come back as the env's exceptions; a lost actor comes back as an
    ``infra_error`` step (see the module docstring).
    """

    def __init__(self, env_id: str, num_envs: int, *, envs_per_actor: int = 1,
                 sandbox_backend: str = "local", sandbox_kwargs: Mapping[str, Any] | None = None,
                 actor_options: Mapping[str, Any] | None = None,
                 ray_init: Mapping[str, Any] | None = None, **env_kwargs: Any):
        if num_envs < 1 or envs_per_actor < 1:
            raise ValueError(f"num_envs and envs_per_actor must be >= 1, got {num_envs} and "
                             f"{envs_per_actor}")
        if "sandbox" in env_kwargs:
            raise ValueError("each actor makes its own sandbox: pass sandbox_backend and "
                             "sandbox_kwargs, not a sandbox object")
        if not ray.is_initialized():
            ray.init(**dict(ray_init or {}))
        elif ray_init:
            logger.warning("Ray is already initialised; ignoring ray_init=%s", dict(ray_init))
        self.num_envs = num_envs
        self.envs_per_actor = envs_per_actor
        self._host_args = (env_id, dict(env_kwargs), sandbox_backend, dict(sandbox_kwargs or {}))
        options = {"scheduling_strategy": "SPREAD", **dict(actor_options or {})}
        self._host = ray.remote(EnvHost).options(max_concurrency=envs_per_actor, **options)
        self._lock = threading.Lock()
        """Guards the bookkeeping below; Ray's callbacks take it, so no Ray call runs under it."""
        self._replacing = threading.Lock()
        """Held by callers (never callbacks) while a dead actor is replaced."""
        self._actors = [self._start(a) for a in range(-(-num_envs // envs_per_actor))]
        self._dead = [False] * len(self._actors)
        self._lost: set[int] = set()
        """Envs whose actor died since their last reset: their episode is gone."""
        self._turns = [0] * num_envs
        """Turns each env's episode has completed."""
        self._problem_ids: list[str | None] = [None] * num_envs
        try:
            self.spaces = ray.get([actor.spaces.remote() for actor in self._actors])[0]
        except BaseException:
            self.close()
            raise

    def _start(self, actor_index: int):
        first = actor_index * self.envs_per_actor
        count = min(self.envs_per_actor, self.num_envs - first)
        return self._host.remote(self._host_args[0], count, *self._host_args[1:])

    def _locate(self, index: int):
        """The live actor hosting env ``index``, its index and the env's slot in it; a dead
        actor is replaced here, in the caller's thread (never in a Ray callback)."""
        if not 0 <= index < self.num_envs:
            raise IndexError(f"env index {index} out of range for {self.num_envs} envs")
        if not self._actors:
            raise RuntimeError("the Ray env pool is closed")
        actor_index, slot = divmod(index, self.envs_per_actor)
        with self._replacing:
            with self._lock:
                actor, dead = self._actors[actor_index], self._dead[actor_index]
            if dead:
                first = actor_index * self.envs_per_actor
                logger.warning("replacing dead Ray env actor %d (envs %d-%d)", actor_index, first,
                               min(self.num_envs, first + self.envs_per_actor) - 1)
                ray.kill(actor, no_restart=True)
                actor = self._start(actor_index)
                with self._lock:
                    self._actors[actor_index], self._dead[actor_index] = actor, False
        return actor, actor_index, slot

    def _mark_dead(self, actor_index: int, actor) -> None:
        with self._lock:
            if self._actors[actor_index] is actor:
                self._dead[actor_index] = True
                first = actor_index * self.envs_per_actor
                self._lost.update(range(first, min(self.num_envs, first + self.envs_per_actor)))

    def actor(self, index: int):
        """The Ray actor handle hosting env ``index`` (e.g. to place or inspect it)."""
        return self._locate(index)[0]

    def _submit(self, index: int, method: str, *args: Any) -> concurrent.futures.Future:
        """Call ``method`` on env ``index``'s actor; a lost actor is marked for replacement
        and its ``RayActorError`` passed on to the caller's future."""
        actor, actor_index, slot = self._locate(index)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def settle(ray_future: concurrent.futures.Future) -> None:
            try:
                future.set_result(ray_future.result())
            except RayActorError as exc:
                self._mark_dead(actor_index, actor)
                future.set_exception(exc)
            except BaseException as exc:  # the env's own error, re-raised where it is awaited
                future.set_exception(exc)

        getattr(actor, method).remote(slot, *args).future().add_done_callback(settle)
        return future

    def reset_async(self, index: int, options: dict | None = None, *,
                    seed: int | None = None) -> concurrent.futures.Future:
        """Start a new episode in env ``index``: a future of ``(obs, info)``."""
        with self._lock:
            self._lost.discard(index)
            self._turns[index] = 0
        future = self._submit(index, "reset", seed, options)

        def remember(done: concurrent.futures.Future) -> None:
            if done.exception() is None:
                self._problem_ids[index] = done.result()[1].get("problem_id")

        future.add_done_callback(remember)
        return future

    def reset(self, index: int, options: dict | None = None, *,
              seed: int | None = None) -> tuple[str, dict[str, Any]]:
        """Start a new episode in env ``index``; a lost actor is replaced and asked once more."""
        return self.reset_many([index], [seed], options)[0]

    def reset_many(self, indices: Sequence[int], seeds: Sequence[int | None],
                   options: dict | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Reset several envs in parallel; those whose actor was lost are retried once on its
        replacement (a reset starts an episode, so nothing is lost but time)."""
        futures = [self.reset_async(i, options, seed=s) for i, s in zip(indices, seeds)]
        results = []
        for index, seed, future in zip(indices, seeds, futures):
            try:
                results.append(future.result())
            except RayActorError as exc:
                logger.warning("env %d's actor was lost during reset (%s); retrying", index, exc)
                results.append(self.reset_async(index, options, seed=seed).result())
        return results

    def step(self, index: int, action: str) -> concurrent.futures.Future:
        """Send env ``index`` one action: a future of ``(obs, reward, terminated, truncated,
        info)``."""
        with self._lock:
            lost = index in self._lost
        if lost:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(self._infra_error(index, "its Ray actor died"))
            return future
        submitted = self._submit(index, "step", action)
        future = concurrent.futures.Future()

        def settle(done: concurrent.futures.Future) -> None:
            exc = done.exception()
            if isinstance(exc, RayActorError):
                future.set_result(self._infra_error(index, f"{type(exc).__name__}: {exc}"))
            elif exc is not None:
                future.set_exception(exc)
            else:
                with self._lock:
                    self._turns[index] += 1
                future.set_result(done.result())

        submitted.add_done_callback(settle)
        return future

    def _infra_error(self, index: int, reason: str) -> StepResult:
        """The step of an episode whose actor died: truncated, scored as nothing."""
        logger.warning("env %d's episode ends as an infra error: %s", index, reason)
        info = {
            "turn": self._turns[index] + 1,
            "problem_id": self._problem_ids[index],
            "tool_called": False,
            "code": "",
            "exec": {"status": ExecStatus.INFRA_ERROR.value, "stdout": "",
                     "stderr": f"{reason}\n", "duration_s": 0.0},
            "format_error": None,
            "final_answer": None,
            "correct": None,
            "grading": None,
            "reward_components": {},
        }
        return "", 0.0, False, True, info

    def call(self, index: int, name: str, *args: Any, **kwargs: Any) -> Any:
        """Env ``index``'s attribute ``name``, called with the arguments when it is callable."""
        return self._submit(index, "call", name, args, kwargs).result()

    def close(self) -> None:
        """Close every env and sandbox, then end the actors; safe to repeat."""
        actors, self._actors = self._actors, []
        if actors:
            done, _ = ray.wait([actor.close.remote() for actor in actors],
                               num_returns=len(actors), timeout=30)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    logger.warning("closing a Ray env actor failed: %s", exc)
        for actor in actors:
            ray.kill(actor, no_restart=True)


class RayVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` TIR envs in Ray actors behind Gymnasium's vector API (next-step autoreset).

    Keyword arguments are ``RayEnvPool``'s: ``envs_per_actor``, ``sandbox_backend``,
    ``sandbox_kwargs``, ``actor_options``, ``ray_init``, and the env's ``gymnasium.make``
    arguments.
    """

    def __init__(self, env_id: str, num_envs: int, **kwargs: Any):
        super().__init__()
        self.pool = RayEnvPool(env_id, num_envs, **kwargs)
        self.num_envs = num_envs
        obs_space, action_space, metadata, render_mode = self.pool.spaces
        self.single_observation_space = obs_space
        self.single_action_space = action_space
        self.observation_space = batch_space(obs_space, num_envs)
        self.action_space = batch_space(action_space, num_envs)
        self.metadata = {**metadata, "autoreset_mode": AutoresetMode.NEXT_STEP}
        self.render_mode = render_mode
        self._observations: list[str | None] = [None] * num_envs
        self._autoreset = np.zeros(num_envs, dtype=bool)

    def env_pool(self) -> RayEnvPool:
        """Per-episode access to the same envs (closing it closes this vector env's actors)."""
        return self.pool

    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[tuple[str, ...], dict[str, Any]]:
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for {self.num_envs} envs")
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is None:
            mask = np.ones(self.num_envs, dtype=bool)
        elif not (isinstance(mask, np.ndarray) and mask.dtype == np.bool_
                  and mask.shape == (self.num_envs,) and mask.any()):
            raise ValueError(f"options['reset_mask'] must be a bool numpy array of shape "
                             f"({self.num_envs},) with at least one True, got {mask!r}")
        indices = np.flatnonzero(mask).tolist()
        results = self.pool.reset_many(indices, [seeds[i] for i in indices], options or None)
        infos: dict[str, Any] = {}
        for i, (obs, info) in zip(indices, results):
            self._observations[i] = obs
            self._autoreset[i] = False
            infos = self._add_info(infos, info, i)
        return tuple(self._observations), infos

    def step(self, actions: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray, np.ndarray,
                                                    np.ndarray, dict[str, Any]]:
        actions = list(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"{len(actions)} actions for {self.num_envs} envs")
        resets = np.flatnonzero(self._autoreset).tolist()
        steps = {i: self.pool.step(i, actions[i])
                 for i in range(self.num_envs) if not self._autoreset[i]}
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        results: dict[int, tuple[str, dict]] = {}
        for i, (obs, info) in zip(resets, self.pool.reset_many(resets, [None] * len(resets))):
            results[i] = obs, info
        concurrent.futures.wait(steps.values())
        for i, future in steps.items():
            obs, rewards[i], terminated[i], truncated[i], info = future.result()
            results[i] = obs, info
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            self._observations[i], info = results[i]
            infos = self._add_info(infos, info, i)
        self._autoreset = terminated | truncated
        return tuple(self._observations), rewards, terminated, truncated, infos

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Every env's attribute ``name`` (called with the arguments when callable)."""
        return tuple(self.pool.call(i, name, *args, **kwargs) for i in range(self.num_envs))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def render(self) -> tuple[Any, ...]:
        return self.call("render")

    def close_extras(self, **kwargs: Any) -> None:
        self.pool.close()
