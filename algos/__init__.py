"""The agents: GTPO, GRPO and PPO over any TIR env, sharing one ``Agent`` loop.

    import algos
    agent = algos.make("gtpo", "HuggingFaceTB/SmolLM2-135M-Instruct", "TIR-Math-v0")
    agent.learn(iterations=10)

A new algorithm is one module: subclass ``algos.agent.Agent`` (usually only its config class, or a
new advantage estimator registered with ``algos.advantages.register_advantage``) and decorate it
with ``@register_algorithm("name")``; importing the module makes ``algos.make("name")`` work.
"""

from __future__ import annotations

import importlib

BUILTIN = ("gtpo", "grpo", "ppo")


def algorithms():
    """The registry of algorithms by name (the built-in ones are imported on first use)."""
    for name in BUILTIN:
        importlib.import_module(f"algos.{name}")
    from algos.agent import ALGORITHMS

    return ALGORITHMS


def get_algorithm(name: str):
    """The ``Agent`` class registered as ``name``; an unknown name lists the registered ones."""
    return algorithms().get(name)


def make(name: str, model, env="TIR-Math-v0", config=None, **kwargs):
    """Build the agent registered as ``name`` (see ``algos.agent.Agent`` for the arguments)."""
    return get_algorithm(name)(model, env, config, **kwargs)


__all__ = ["BUILTIN", "algorithms", "get_algorithm", "make"]
