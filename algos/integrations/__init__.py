"""Trainer-side adapters: our multi-turn rollouts and GTPO advantages inside other RL frameworks.

One module per framework, each importable without the others, each behind its optional extra:

- ``algos.integrations.trl`` (``pip install tir-gym[trl]``): a ``rollout_func`` that runs TIR
  episodes through our env and sandbox, and ``GTPOTrainer``, TRL's ``GRPOTrainer`` with GTPO's
  per-token advantages;
- ``algos.integrations.verl`` (``pip install tir-gym[verl]``): ``register_adv_est("gtpo")`` and
  ``TIRAgentLoop``, an agent loop that runs our env's turns against verl's async LLM server.

The env-side adapters (SkyRL-gym, GEM registries) live in ``tir_envs.integrations``.
"""
