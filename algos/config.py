"""Config dataclasses of the agents: every knob says what it does and where its default comes from.

``AlgoConfig`` holds what every agent's trainer needs; ``GRPOConfig``, ``GTPOConfig`` and
``PPOConfig`` add what differs. Values are checked in ``__post_init__`` so a bad config fails at
construction with the field's name, never halfway through a run. Each of GTPO's three ideas can be
switched off for ablations: ``turn_rewards``, ``gamma`` (with ``norm_scope``) and ``shaping``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from algos.advantages import check_config
from algos.shaping import SIMILARITIES

__all__ = ["AlgoConfig", "GRPOConfig", "GTPOConfig", "PPOConfig"]

DTYPES = ("float32", "bfloat16", "float16")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "constant")
KL_ESTIMATORS = ("k1", "k3")
TRAJECTORY_REWARDS = ("sum", "min_acc_format", "min_acc_penalty")
ZERO_VARIANCE_GROUPS = ("keep", "drop")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class AlgoConfig:
    """Knobs shared by every agent: sampling, optimisation, the policy loss, rewards, shaping."""

    advantage: str = "grpo"
    """Name of the registered advantage estimator (``algos.advantages.get_advantage``). The
    config must have every field the estimator reads (its ``Estimator.reads``): checked here."""

    # --- run ---
    seed: int = 0
    """Seeds prompt sampling, generation and initialisation, so a run can be repeated."""
    dtype: str = "float32"
    """Parameter dtype of the policy: float32 | bfloat16 | float16. float32 on CPU."""

    # --- sampling ---
    group_size: int = 8
    """G, rollouts per prompt. Group statistics need G >= 2; 8 as in TRL's num_generations."""
    prompts_per_iteration: int = 16
    """Prompts sampled per iteration; the batch holds prompts_per_iteration * G trajectories."""

    # --- optimisation ---
    lr: float = 1e-6
    """AdamW learning rate. 1e-6 is the GRPO/DAPO/verl default for billion-parameter models;
    tiny models learn faster with a larger one."""
    update_epochs: int = 1
    """Passes over each iteration's batch. 1 keeps GRPO on-policy (DeepSeekMath, TRL);
    more epochs reuse samples and make the clip matter (PPO: 4 in CleanRL)."""
    minibatch_size: int = 32
    """Trajectories per optimizer step; several steps per epoch when smaller than the batch."""
    grad_accum_steps: int = 1
    """Micro-batches per minibatch, to bound memory: minibatch_size must be a multiple."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (1.0 in TRL and verl); math.inf disables it."""
    lr_warmup_steps: int = 0
    """Optimizer steps over which the learning rate rises linearly from lr/steps to lr (verl's
    lr_warmup_steps; TRL's warmup_steps). 0 (TRL's default): the full rate from the first step;
    RL starts from a trained model, not from a random one."""

    # --- policy loss ---
    clip_low: float = 0.2
    """PPO clip below: the ratio's lower bound is 1 - clip_low (0.2, Schulman et al. 2017)."""
    clip_high: float = 0.2
    """PPO clip above: the upper bound is 1 + clip_high. DAPO's clip-higher uses 0.28 so
    low-probability tokens can grow, which keeps entropy from collapsing. 0.2 stays the default:
    on ``benchmarks/compare.py`` 0.28 scored +2.0 points over GTPO [+0.5, +3.5] on 5 paired
    seeds, one of 6 stabilisers tested, and a confirmatory retest on 5 fresh seeds gave -0.3
    [-1.7, +1.2] (README, "Algorithm comparison")."""
    loss_aggregation: str = "token_mean"
    """How token losses become one number: token_mean (every generated token weighs the same;
    DAPO, verl default), seq_mean (mean per sequence, then over sequences: GRPO paper; long
    answers weigh less per token), constant (sum over tokens / (sequences * loss_constant):
    Dr.GRPO, no length bias)."""
    loss_constant: int | None = None
    """Normaliser of the constant aggregation, in tokens; None uses the padded length of the
    batch (Dr.GRPO uses the generation budget). Ignored by the other aggregations."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen reference policy; 0 needs no reference model
    (DAPO, Dr.GRPO and TRL's default; DeepSeekMath used 0.04)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator: k1 = log pi - log pi_ref (unbiased, can go negative), k3 =
    exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, always >= 0; GRPO)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss); 0 as in TRL and verl."""

    # --- rewards ---
    turn_rewards: bool = False
    """Use each turn's reward where it happened. Off: the trajectory reward (see
    trajectory_reward) sits on the final turn, as GRPO sees it."""
    trajectory_reward: str = "sum"
    """How turn rewards become one trajectory reward when turn_rewards is off: sum (of all
    turn rewards) | min_acc_format (the GTPO paper's GRPO baseline, min(r_acc, r_fmt) with a
    binary format term: 0 when any turn was penalised, else the accuracy) | min_acc_penalty
    (the summed penalty when any turn was penalised, else the accuracy)."""
    adv_eps: float = 1e-6
    """Added to the standard deviation when advantages are divided by it."""

    # --- what reaches the loss ---
    void_turn_filter: bool = False
    """Leave out of the loss every trajectory with a void turn: one that has neither a complete
    code block nor a final answer, typically cut off by the token limit (SimpleTIR, arXiv
    2509.02479: such turns carry low-probability tokens whose gradients blow up). Their
    rewards still count in group statistics. Off by default: a cut-off turn is the model's own
    failure, and its negative advantage is what teaches it to finish a turn in budget."""
    zero_variance_groups: str = "keep"
    """What to do with groups whose advantages are all 0 (every sample scored alike): keep
    (their tokens count in the loss normaliser, diluting the others: GRPO, TRL) | drop (left
    out of the batch, so the normaliser counts only informative tokens: DAPO's dynamic
    sampling without the resampling). keep by default, as GRPO and TRL define the loss; drop
    scales the step up as groups saturate, which is what DAPO wants and a small model may not.
    drop was the best GTPO variant on ``benchmarks/compare.py`` (+2.2 points [+0.4, +4.0] over
    5 paired seeds, one of 6 stabilisers tested), but a confirmatory retest on 5 fresh seeds
    gave -0.2 [-2.6, +2.2], so keep stays the default."""
    skip_flat_rows: bool = True
    """Leave rows whose advantages are all 0 out of the update's forward pass when no KL,
    entropy or value term reads them. They still count in the loss normaliser, so the gradient
    is the same and only time is saved (groups that all scored alike cost nothing); off, every
    row is computed (what a throughput benchmark times)."""

    # --- GTPO self-supervised reward shaping (see algos.shaping) ---
    shaping: bool = False
    """Give a failed trajectory partial accuracy credit for code like its group's successes."""
    shaping_alpha: float = 0.5
    """Scale of the shaped accuracy: alpha * mean similarity to the successes. Below 1, so a
    shaped reward stays under a correct one's (GTPO paper: 0.5)."""
    similarity: str = "lexical"
    """Code similarity for shaping: lexical (character n-gram TF-IDF cosine, fast, no model)
    | embedding (all-MiniLM-L6-v2 sentence embeddings; needs sentence-transformers)."""

    def __post_init__(self) -> None:
        check_config(self)
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        _require(self.prompts_per_iteration >= 1,
                 f"prompts_per_iteration must be >= 1, got {self.prompts_per_iteration}")
        _require(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        _require(self.update_epochs >= 1, f"update_epochs must be >= 1, got {self.update_epochs}")
        _require(self.grad_accum_steps >= 1,
                 f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _require(self.minibatch_size >= 1 and self.minibatch_size % self.grad_accum_steps == 0,
                 f"minibatch_size ({self.minibatch_size}) must be a positive multiple of "
                 f"grad_accum_steps ({self.grad_accum_steps})")
        batch = self.prompts_per_iteration * self.group_size
        _require(self.minibatch_size <= batch,
                 f"minibatch_size ({self.minibatch_size}) exceeds the batch of "
                 f"prompts_per_iteration * group_size = {batch} trajectories")
        _require(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        _require(self.lr_warmup_steps >= 0,
                 f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        _require(self.zero_variance_groups in ZERO_VARIANCE_GROUPS,
                 f"zero_variance_groups must be one of {ZERO_VARIANCE_GROUPS}, "
                 f"got {self.zero_variance_groups!r}")
        _require(0 <= self.clip_low < 1, f"clip_low must be in [0, 1), got {self.clip_low}")
        _require(self.clip_high >= 0, f"clip_high must be >= 0, got {self.clip_high}")
        _require(self.loss_aggregation in LOSS_AGGREGATIONS,
                 f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, "
                 f"got {self.loss_aggregation!r}")
        _require(self.loss_constant is None or self.loss_constant > 0,
                 f"loss_constant must be None or > 0, got {self.loss_constant}")
        _require(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        _require(self.kl_estimator in KL_ESTIMATORS,
                 f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        _require(self.entropy_coef >= 0, f"entropy_coef must be >= 0, got {self.entropy_coef}")
        _require(self.trajectory_reward in TRAJECTORY_REWARDS,
                 f"trajectory_reward must be one of {TRAJECTORY_REWARDS}, "
                 f"got {self.trajectory_reward!r}")
        _require(self.adv_eps > 0, f"adv_eps must be > 0, got {self.adv_eps}")
        _require(0 <= self.shaping_alpha < 1,
                 f"shaping_alpha must be in [0, 1) so a shaped reward stays below a correct "
                 f"one, got {self.shaping_alpha}")
        _require(self.similarity in SIMILARITIES,
                 f"similarity must be one of {SIMILARITIES.names()}, got {self.similarity!r}")

    def to_dict(self) -> dict[str, object]:
        """Plain values, for logs and checkpoints."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _GroupConfig(AlgoConfig):
    """Group-relative estimators (GRPO, GTPO): advantages are normalised within prompt groups."""

    norm_scope: str = "group"
    """Which rewards set the baseline and the scale: group (mean and std of the prompt's group),
    batch (the group's mean, the batch's std: Lite PPO), none (the group's mean only:
    Dr.GRPO, no difficulty bias)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.group_size >= 2,
                 f"group-relative advantages need group_size >= 2, got {self.group_size}")


@dataclass
class GRPOConfig(_GroupConfig):
    """GRPO (Shao et al. 2024): one reward per trajectory, normalised within its group."""

    advantage: str = "grpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(not self.turn_rewards,
                 "GRPO rewards whole trajectories: turn_rewards must be False (use GTPOConfig)")


@dataclass
class GTPOConfig(_GroupConfig):
    """GTPO (arXiv 2511.14846): turn rewards, normalised discounted returns, code-similarity
    shaping. turn_rewards=False, gamma=1 and shaping=False give back GRPO's advantages when
    every trajectory of a group has one turn."""

    advantage: str = "gtpo"
    turn_rewards: bool = True
    gamma: float = 0.9
    """Discount of turn returns R_ij = sum_{m>=j} gamma^(m-j) r_im (paper: 0.9). 1 gives the
    undiscounted reward-to-go; 0 each turn's own reward."""
    norm_scope: str = "turn"
    """How returns become advantages: turn (mean and std of the group's returns at the same turn
    index) | group (all turns of the group pooled) | global (all turns of the batch pooled) |
    batch | none (the group's pooled mean; the batch's std, or none).

    Why turn: the paper (arXiv 2511.14846, section 3.2) calls its advantages "normalized
    discounted returns"; its equation text could not be read from here, and third-party code
    differs (one SkyRL fork normalises over the whole batch, citing "Eq. 7"). Any pooled scope
    compares returns across turn positions, and with gamma < 1 an earlier turn's return is
    smaller only because it is further from the reward: a group of 4 trajectories all correct in
    2 turns gets [-0.94, +0.94] on every trajectory (group), so every correct tool call is
    pushed down, and a correct tool call beside a correct no-tool answer gets -0.80. Measured
    in ``benchmarks/compare.py`` (5 seeds): under group 37% of correct trajectories' code turns
    got a negative advantage, under turn none; the held-out score did not differ measurably at
    its 20 iterations (an earlier 80-iteration audit at lr 5e-4 had turn 7.7 points above group). turn gives 0 where outcomes
    carry no preference, keeps the outcome's sign on every turn of a mixed group, is GRPO on
    one-turn trajectories and ignores trajectory order (tests/test_advantages.py checks each);
    the pooled readings stay as options for ablations."""
    shaping: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")


@dataclass
class PPOConfig(AlgoConfig):
    """PPO with a value head: rewards on each turn's last token, GAE over generated tokens."""

    advantage: str = "gae"
    turn_rewards: bool = True
    group_size: int = 1
    """PPO's baseline is the critic, so one rollout per prompt suffices."""
    prompts_per_iteration: int = 128
    """128 prompts x 1 rollout: as many trajectories per batch as GRPO's 16 x 8."""
    update_epochs: int = 2
    """Critic-based advantages tolerate reuse; verl uses 1, CleanRL 4."""
    gamma: float = 1.0
    """Token-level discount (1.0 in verl and Open-Reasoner-Zero: the only reward is at the end)."""
    lam: float = 1.0
    """GAE lambda: 1 is the Monte-Carlo return minus the value (verl, Open-Reasoner-Zero);
    lower trades variance for the critic's bias (CleanRL: 0.95)."""
    vf_coef: float = 0.5
    """Weight of the value loss beside the policy loss (CleanRL: 0.5)."""
    value_clip: float = 0.2
    """The new value may move at most this far from the rollout's value before its loss is
    clipped (CleanRL: 0.2; verl: 0.5); math.inf disables it."""
    whiten_advantages: bool = True
    """Normalise GAE advantages to mean 0, std 1 over the batch's generated tokens (verl)."""
    critic_trains_trunk: bool = False
    """Whether the value loss trains the transformer the policy shares with the value head. Off,
    the head learns on detached features and an untrained critic cannot wreck the policy (on
    ``benchmarks/compare.py``'s task a trunk-training critic broke every tool call within 3
    iterations). On, it is the classic shared actor-critic (e.g. TRL's former value-head PPO)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        _require(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}")
        _require(self.value_clip > 0, f"value_clip must be > 0, got {self.value_clip}")
