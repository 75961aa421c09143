"""The generation interface every backend implements: token ids in, token ids and logprobs out.

Rollouts keep the exact ids a backend sampled (never decode and re-tokenize), and the trainer's
importance ratio needs the logprob each token had when it was sampled. A backend reports that
logprob as ``log_softmax(logits / temperature)[token]``, the same formula the trainer uses to
recompute it, and *before* top-p truncation (the trainer cannot reproduce a truncated
distribution cheaply, and with ``top_p=1`` the two agree). Greedy decoding
(``temperature=0``) reports ``log_softmax(logits)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one turn.

    ``stop`` strings end a sequence as soon as its generated text contains one of them (e.g. the
    closing fence ``"```\\n"`` of a python block, which ``"```python\\n"`` does not contain); the
    token that completes the stop string is kept, so the text may run a few characters past it.
    ``seed`` makes one call reproducible without touching the global RNG; ``None`` uses it.
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated turn.

    ``token_ids`` are exactly the sampled ids, ending at the eos id (kept), the token that completed
    a stop string, or ``max_new_tokens``; ``logprobs[i]`` belongs to ``token_ids[i]`` (see the
    module docstring). ``text`` decodes ``token_ids`` without special tokens, for the env.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError("token_ids and logprobs must have the same length")


class GenerationError(RuntimeError):
    """The backend itself failed (a server died or stopped answering), not the model: the
    episodes it was generating for end as infra errors, excluded from scores and from the loss."""


class Generator(abc.ABC):
    """A generation backend. ``generate`` batches all prompts in one call; results keep order."""

    concurrency: int = 1
    """How many ``generate`` calls may run at once, from different threads. A backend that batches
    requests across calls (a server's or transformers' continuous batching) sets it high, and the
    rollout then sends each episode's turn in its own call the moment it is ready."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Continue each prompt (a list of token ids) once; raise ``GenerationError`` when the
        backend, not the request, failed."""

    def update_weights(self, model) -> None:
        """Make the backend sample from ``model``'s current weights (called after each update).
        A backend that samples from the trained model object itself has nothing to do."""

    def close(self) -> None:
        """Release what the backend holds (engines, connections)."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_prompts(prompts: list[list[int]]) -> None:
    """Reject what every backend would choke on, with a message that says which prompt."""
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) or not len(prompt):
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
