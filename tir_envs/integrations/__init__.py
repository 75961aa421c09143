"""Env-side adapters: our TIR envs, with their sandbox and per-turn rewards, in other registries.

One module per framework, each importable without the others, each behind its optional extra;
importing one registers every id of ``tir_envs.ENV_IDS`` (``TIR-Math-v0``, ...) there:

- ``tir_envs.integrations.skyrl`` (``pip install tir-gym[skyrl]``): ``skyrl_gym.make(id)``;
- ``tir_envs.integrations.gem`` (``pip install tir-gym[gem]``): ``gem.make(id)``,
  ``gem.make_vec([id] * n)``.

``tir_envs.integrations.ray`` (``pip install tir-gym[ray]``) is no registry but a vector env:
``RayVectorEnv(id, n)`` runs the envs in Ray actors, each actor with its own sandbox.

Frameworks that build one env object per sample share one sandbox per process
(:func:`shared_sandbox`); each episode still gets its own kernel session.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping
from typing import Any

_SANDBOXES: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def shared_sandbox(backend: str = "local", options: Mapping[str, Any] | None = None):
    """The process's sandbox for ``(backend, options)``, made on first use, closed at exit."""
    key = (backend, tuple(sorted((options or {}).items())))
    with _LOCK:
        sandbox = _SANDBOXES.get(key)
        if sandbox is None:
            from tir_envs.sandbox import make_sandbox

            sandbox = _SANDBOXES[key] = make_sandbox(backend, **dict(options or {}))
            atexit.register(sandbox.close)
        return sandbox


def make_tir_env(env_id: str, *, sandbox_backend: str = "local",
                 sandbox_kwargs: Mapping[str, Any] | None = None, max_turns: int | None = None,
                 **env_kwargs: Any):
    """``gymnasium.make(env_id, ...)`` on the shared sandbox, with ``max_turns`` applied to both
    the env and its ``TimeLimit``."""
    import gymnasium

    import tir_envs

    turns = tir_envs.DEFAULT_MAX_TURNS if max_turns is None else int(max_turns)
    return gymnasium.make(env_id, sandbox=shared_sandbox(sandbox_backend, sandbox_kwargs),
                          max_turns=turns, max_episode_steps=turns, **env_kwargs)


def problem_ids(env_id: str = "TIR-Math-v0", n: int = 256, seed: int = 0,
                **env_kwargs: Any) -> list[str]:
    """``n`` problem ids of ``env_id``'s source, for a trainer's dataset rows (an adapter pins each
    episode to its row's id). Procedural problems are drawn with ``seed``; a finite source (a
    benchmark, a file) gives its first ``n`` problems in order."""
    import gymnasium
    import numpy as np

    import tir_envs  # noqa: F401  (registers the ids)

    env = gymnasium.make(env_id, **env_kwargs).unwrapped
    try:
        source = env.source
        if hasattr(source, "__len__"):
            return [source.get(i).id for i in range(min(n, len(source)))]
        rng = np.random.default_rng(seed)
        return [source.sample(rng).id for _ in range(n)]
    finally:
        env.close()


__all__ = ["make_tir_env", "problem_ids", "shared_sandbox"]
