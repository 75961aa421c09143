"""GEM adapter: ``gem.make("TIR-Math-v0")`` and ``gem.make_vec`` run our env behind GEM's API.

Tested with ``gem-llm==0.1.0`` (``pip install tir-gym[gem]``). Importing this module registers every
id of ``tir_envs.ENV_IDS``::

    import gem
    import tir_envs.integrations.gem  # noqa: F401

    env = gem.make("TIR-Math-v0", seed=0, max_turns=4)
    obs, info = env.reset()
    obs, reward, terminated, truncated, info = env.step("```python\\nprint(2**10)\\n```")
    group = [env.spawn(same_state=True) for _ in range(4)]    # 4 rollouts of this problem
    vec = gem.make_vec(["TIR-Math-v0"] * 8, vec_kwargs=[{"problem_id": pid}] * 8)

GEM's API is Gymnasium's with strings, so this is a thin wrapper: ``reset`` and ``step`` are our
env's, per-turn reward and ``info`` included. Beyond the ``gymnasium.make`` arguments of
``TIRMathEnv`` the constructor takes ``seed`` (the first ``reset`` draws with it, as
``make_vec`` expects), ``problem_id`` (every episode plays that problem: a group member),
``max_turns``, ``sandbox_backend`` and ``sandbox_kwargs``. Envs of one process share one sandbox,
including ``make_vec(..., async_mode=True)``, whose thread pool steps them concurrently.
``spawn(same_state=True)`` gives an env pinned to the current problem. GEM's vector envs reset a
finished env within the same ``step`` (its default), so that step returns the next episode's
observation and info; the final turn's reward is kept.
"""

from __future__ import annotations

import functools
from typing import Any

from gem import Env, register
from gem.envs.registration import ENV_REGISTRY

from tir_envs import ENV_IDS
from tir_envs.integrations import make_tir_env

__all__ = ["TIRGemEnv"]


class TIRGemEnv(Env):
    """Our TIR env as a ``gem.Env`` (see the module docstring)."""

    def __init__(self, env_id: str = "TIR-Math-v0", seed: int | None = None,
                 problem_id: str | None = None, **kwargs: Any):
        super().__init__()
        self.env_id, self.seed, self.problem_id, self.kwargs = env_id, seed, problem_id, kwargs
        self.env = make_tir_env(env_id, **kwargs)
        self._current: str | None = None
        self._seeded = False

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        # GEM's base reset seeds the global RNGs; our env keeps its own, so that is skipped.
        if seed is None and not self._seeded:
            seed = self.seed
        self._seeded = True
        options = None if self.problem_id is None else {"problem_id": self.problem_id}
        obs, info = self.env.reset(seed=seed, options=options)
        self._current = info["problem_id"]
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        return self.env.step(action)

    def spawn(self, same_state: bool = False, **kwargs: Any) -> TIRGemEnv:
        """A new env of the same configuration; ``same_state=True`` pins it to the problem this
        env is playing (a GRPO group member). ``kwargs`` override the configuration."""
        problem = self._current if same_state and self._current else self.problem_id
        config = {"seed": self.seed, "problem_id": problem, **self.kwargs, **kwargs}
        return TIRGemEnv(self.env_id, **config)

    def sample_random_action(self) -> str:
        return "```python\nprint(1)\n```"

    def close(self) -> None:
        self.env.close()


for _env_id in ENV_IDS:
    if _env_id not in ENV_REGISTRY:
        # GEM's register() takes the id as its own `env_id`: bind ours positionally instead.
        register(_env_id, functools.partial(TIRGemEnv, _env_id))
