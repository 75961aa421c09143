"""GTPO (Group Turn Policy Optimization, arXiv 2511.14846).

Three changes to GRPO, each switchable in ``GTPOConfig`` for ablations:
turn-level rewards straight from the env (``turn_rewards``), advantages from discounted turn
returns normalised within the group at each turn position (``gamma``, ``norm_scope``; estimator
``gtpo``), and
self-supervised shaping of failed trajectories by code similarity to the group's successes
(``shaping``). The loop itself is the shared ``Agent``'s.
"""

from algos.agent import Agent, register_algorithm
from algos.config import GTPOConfig


@register_algorithm("gtpo")
class GTPO(Agent):
    config_class = GTPOConfig
