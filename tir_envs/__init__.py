"""tir-gym environments: importing this package registers every env id with Gymnasium.

``TIR-Math-v0`` draws offline procedural problems; the other ids read one benchmark file each
(from ``TIR_DATA_DIR`` or ``data_dir=``) at the first ``reset``. Registration imports nothing heavy,
so ``gymnasium.make("tir_envs:TIR-Math-v0")`` costs little until the env is used.
"""

from __future__ import annotations

from gymnasium.envs import registration as gym_registration

import tir_envs.procedural  # noqa: F401  (registers the pinned procedural test set)
from tir_envs.data import BENCHMARKS

DEFAULT_MAX_TURNS = 4

ENV_IDS: dict[str, str] = {
    "TIR-Math-v0": "procedural",
    **{spec.env_id: name for name, spec in BENCHMARKS.items()},
}
"""Env id -> its ``problems`` argument: the procedural default, then one id per registered
benchmark (``tir_envs.data.BENCHMARKS``)."""

for _env_id, _problems in ENV_IDS.items():
    if _env_id not in gym_registration.registry:
        gym_registration.register(
            id=_env_id,
            entry_point="tir_envs.env:TIRMathEnv",
            max_episode_steps=DEFAULT_MAX_TURNS,
            kwargs={"problems": _problems},
        )

__all__ = ["DEFAULT_MAX_TURNS", "ENV_IDS"]
