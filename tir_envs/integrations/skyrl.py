"""SkyRL-gym adapter: ``skyrl_gym.make("TIR-Math-v0", ...)`` returns our env behind SkyRL's API.

Tested with ``skyrl-gym==0.4.0`` (``pip install tir-gym[skyrl]``). Importing this module registers
every id of ``tir_envs.ENV_IDS``::

    import skyrl_gym
    import tir_envs.integrations.skyrl  # noqa: F401

    env = skyrl_gym.make("TIR-Math-v0", env_config={"max_turns": 4},
                         extras={"problem_id": "modpow/123"})
    messages, info = env.init()                    # system + user messages of the problem
    out = env.step("```python\\nprint(2**10)\\n```")  # observations, reward, done, metadata

SkyRL builds one env per sample (``env_config`` from its ``environment.skyrl_gym`` section,
``extras`` from the dataset row) and calls ``init(prompt)`` then ``step(action)`` until ``done``.
Here:

- ``extras`` pins the problem: ``problem_id`` or ``problem_index`` (top level or inside
  ``extra_info``), else a problem is drawn with ``seed`` (default: the env's own RNG). A group of
  G samples of one row thus plays one problem G times.
- ``init`` returns our prompt as chat messages (the env renders its own prompt, so the dataset's
  ``prompt`` is not used) and the reset info.
- ``step`` returns the tool output as one ``user`` message (``observation_role`` in
  ``env_config``), the turn's own reward (not a trajectory total) and our full ``info`` as
  ``metadata`` (``reward_components``, ``exec``, ``correct``, ...). ``done`` is terminated or
  truncated.
- ``env_config`` keys: ``max_turns``, ``sandbox_backend``, ``sandbox_kwargs``,
  ``observation_role``, and any ``gymnasium.make`` argument of ``TIRMathEnv``. Envs of one process
  share one sandbox; each episode gets its own kernel session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from skyrl_gym import register, registry
from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

from tir_envs import ENV_IDS
from tir_envs.integrations import make_tir_env

__all__ = ["TIRSkyRLEnv"]


def _plain(config: Any) -> dict[str, Any]:
    """A plain dict from ``None``, a mapping or an OmegaConf ``DictConfig``."""
    if config is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return dict(OmegaConf.to_container(config, resolve=True))
    except ImportError:
        pass
    return dict(config)


class TIRSkyRLEnv(BaseTextEnv):
    """One TIR episode as a SkyRL ``BaseTextEnv`` (see the module docstring)."""

    def __init__(self, env_config: Any = None, extras: Mapping[str, Any] | None = None,
                 env_id: str = "TIR-Math-v0"):
        super().__init__()
        config = _plain(env_config)
        extras = _plain(extras)
        self.observation_role = config.pop("observation_role", "user")
        self.env = make_tir_env(config.pop("env_id", env_id), **config)
        self.max_turns = self.env.unwrapped.max_turns
        info = _plain(extras.get("extra_info"))
        self.options = {key: source[key] for source in (info, extras)
                        for key in ("problem_id", "problem_index") if key in source}
        self.seed = extras.get("seed", info.get("seed"))
        self.turn_rewards: list[float] = []
        self.last_info: dict[str, Any] = {}

    def init(self, prompt: Any = None) -> tuple[list[dict[str, str]], dict[str, Any]]:
        _, info = self.env.reset(seed=self.seed, options=self.options or None)
        self.turns, self.turn_rewards, self.last_info = 0, [], {}
        return list(info["messages"]), {k: v for k, v in info.items() if k != "messages"}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.turns += 1
        self.turn_rewards.append(float(reward))
        self.last_info = info
        done = bool(terminated or truncated)
        observations = [] if done else [{"role": self.observation_role, "content": obs}]
        return BaseTextEnvStepOutput(observations=observations, reward=float(reward), done=done,
                                     metadata=info, postprocessed_action=None)

    def get_metrics(self) -> dict[str, Any]:
        return {"turns": self.turns, "return": float(sum(self.turn_rewards)),
                "correct": float(bool(self.last_info.get("correct")))}

    def close(self) -> None:
        self.env.close()


for _env_id in ENV_IDS:
    if _env_id not in registry:
        register(id=_env_id, entry_point=f"{__name__}:TIRSkyRLEnv", kwargs={"env_id": _env_id})
