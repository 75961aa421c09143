"""tir-gym environments: importing this package registers every env id with Gymnasium.

``TIR-Math-v0`` draws offline procedural problems; the other ids read one benchmark file each
(from ``TIR_DATA_DIR`` or ``data_dir=``) at the first ``reset``. Registration imports nothing heavy,
so ``gymnasium.make("tir_envs:TIR-Math-v0")`` costs little until the env is used.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

DEFAULT_MAX_TURNS = 4

ENV_IDS: dict[str, str] = {
    "TIR-Math-v0": "procedural",
    "TIR-MATH500-v0": "math500",
    "TIR-AIME24-v0": "aime24",
    "TIR-AMC23-v0": "amc23",
    "TIR-GSM8K-v0": "gsm8k",
    "TIR-SVAMP-v0": "svamp",
}
"""Env id -> its ``problems`` argument."""

for _env_id, _problems in ENV_IDS.items():
    if _env_id not in registry:
        register(
            id=_env_id,
            entry_point="tir_envs.env:TIRMathEnv",
            max_episode_steps=DEFAULT_MAX_TURNS,
            kwargs={"problems": _problems},
        )

__all__ = ["DEFAULT_MAX_TURNS", "ENV_IDS"]
