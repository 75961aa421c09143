"""Env pools: sub-envs that step one at a time, so each episode advances on its own.

A pool has ``num_envs``, ``reset(index, options) -> (obs, info)``, ``step(index, action)`` returning
a ``concurrent.futures.Future`` of ``(obs, reward, terminated, truncated, info)``, and ``close()``.
``algos.rollout.collect`` drives episodes through one; a vector env can offer its own pool (a Ray
vector env's actors) through an ``env_pool()`` method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class ThreadEnvPool:
    """The sub-envs of a ``SyncVectorEnv``, each step run in a worker thread.

    The sandbox runs code and the grader checks answers in other processes, so threads overlap env
    steps with generation and with each other. The vector env keeps owning its envs: ``close``
    stops the threads only.
    """

    def __init__(self, envs: list):
        if not envs:
            raise ValueError("an env pool needs at least one env")
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        self._executor = ThreadPoolExecutor(max_workers=self.num_envs, thread_name_prefix="env-step")

    def reset(self, index: int, options: dict[str, Any] | None = None):
        return self.envs[index].reset(options=options)

    def step(self, index: int, action: str) -> Future:
        return self._executor.submit(self.envs[index].step, action)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@contextlib.contextmanager
def env_pool(vec_env) -> Iterator[ThreadEnvPool | Any | None]:
    """The vector env's own pool when it has one (``vec_env.env_pool()``; it stays open, the
    vector env owns it), else a thread pool over its sub-envs (``vec_env.envs``, as
    ``SyncVectorEnv`` has), closed on exit; ``None`` for a vector env with neither (e.g.
    ``AsyncVectorEnv``), which can only step in lockstep. Vector wrappers are looked through:
    they wrap the lockstep ``step``, which a pool does not call."""
    base = vec_env.unwrapped
    if hasattr(base, "env_pool"):
        yield base.env_pool()
        return
    envs = getattr(base, "envs", None)
    if not envs:
        yield None
        return
    pool = ThreadEnvPool(envs)
    try:
        yield pool
    finally:
        pool.close()
