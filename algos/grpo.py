"""GRPO (Shao et al. 2024): one reward per trajectory, normalised within its prompt group and
broadcast to every generated token (estimator ``grpo``). Dr.GRPO is ``norm_scope="none"`` with
``loss_aggregation="constant"``."""

from algos.agent import Agent, register_algorithm
from algos.config import GRPOConfig


@register_algorithm("grpo")
class GRPO(Agent):
    config_class = GRPOConfig
