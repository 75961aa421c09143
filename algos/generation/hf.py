"""The default backend: transformers' ``generate`` on the policy model itself (no weight sync).

All prompts go through one left-padded batch with a KV cache (or chunks of ``max_batch_size``,
sorted by length so chunks pad little). Two small hooks ride along inside ``generate``:

- a logits processor records each sampled token's logprob, ``log_softmax(logits / T)``, from the
  raw logits before temperature and top-p are applied (those run after it, as our own warpers), so
  memory stays one ``[batch, vocab]`` tensor instead of ``output_logits``' ``[steps, batch, vocab]``;
- a stopping criterion ends each sequence on its own once its generated text contains a stop string.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from algos.generation.base import Completion, Generator, SamplingParams, check_prompts

logger = logging.getLogger(__name__)


class HFGenerator(Generator):
    """Batched ``model.generate`` returning exact sampled ids and their sampling logprobs.

    ``model`` must be the unwrapped causal LM that the trainer updates (not a DDP/accelerate
    wrapper, and for PPO ``PolicyWithValue.policy``); since it is the same object,
    ``update_weights`` has nothing to do.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int | None = None,
    ):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        check_prompts(prompts)
        if not prompts:
            return []
        size = self.max_batch_size or len(prompts)
        order = list(range(len(prompts)))
        if size < len(prompts):
            order.sort(key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with _seeded(params.seed, self.model.device):
                for start in range(0, len(order), size):
                    chunk = order[start : start + size]
                    batch = self._generate_batch([prompts[i] for i in chunk], params)
                    for i, completion in zip(chunk, batch):
                        results[i] = completion
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1

        recorder = _LogprobRecorder(params.temperature if not params.greedy else 1.0)
        processors = LogitsProcessorList([recorder])
        if not params.greedy and params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if not params.greedy and params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        stopper = _StopOnStrings(self.tokenizer, params.stop, width, self.eos_ids) if params.stop else None

        model_config = self.model.generation_config
        # generate() fills unset fields from the model's generation config (repetition penalty,
        # min_p, ...), which would change the distribution we record: swap in a clean one. Temperature
        # and top-p stay neutral here; our own warpers after the recorder apply them.
        self.model.generation_config = GenerationConfig(
            bos_token_id=model_config.bos_token_id,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            top_k=None if params.greedy else 0,  # None would be filled with top_k=50
            use_cache=True,
        )
        try:
            sequences = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stopper] if stopper else []),
            )
        finally:
            self.model.generation_config = model_config
        generated = sequences[:, width:]
        logprobs = recorder.finish(generated).tolist()
        generated = generated.tolist()

        completions = []
        for row, ids in enumerate(generated):
            end, reason = len(ids), "length"
            eos_at = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
            stop_at = stopper.stopped_at.get(row) if stopper else None
            if eos_at is not None and (stop_at is None or eos_at <= stop_at):
                end, reason = eos_at + 1, "eos"
            elif stop_at is not None:
                end, reason = stop_at + 1, "stop"
            ids = ids[:end]
            completions.append(
                Completion(
                    token_ids=ids,
                    logprobs=logprobs[row][:end],
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason=reason,
                )
            )
        return completions


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a sequence: the model's generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("neither the model's generation config nor the tokenizer has an eos id")
    return eos


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """A seeded call forks the RNG so it neither depends on nor disturbs the global stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class _LogprobRecorder(LogitsProcessor):
    """Records ``log_softmax(raw_logits / temperature)`` at each sampled token.

    At step t the processor sees the logits for step t and the token sampled at step t-1 (the last
    input id), so it keeps one step's distribution pending; ``finish`` gathers the final step's.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """``[batch, steps]`` logprobs for the generated ids (padding positions included)."""
        if self.pending is not None:
            last = generated[:, len(self.steps) : len(self.steps) + 1]
            self.steps.append(self.pending.gather(1, last).squeeze(1))
            self.pending = None
        return torch.stack(self.steps, dim=1).cpu()


class _StopOnStrings(StoppingCriteria):
    """Stops each sequence once its generated text contains a stop string.

    Only a short tail of generated ids is decoded per step: a stop string completed by the newest
    token lies within its last ``len(stop bytes)`` tokens, since every token is at least one byte.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_width = prompt_width
        self.eos_ids = set(eos_ids)
        self.window = max(len(s.encode()) for s in stops) + 2
        self.stopped_at: dict[int, int] = {}
        self.ended: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_width :]
        step = generated.shape[1] - 1
        done = torch.zeros(generated.shape[0], dtype=torch.bool, device=input_ids.device)
        last = generated[:, -1].tolist()
        live = []
        for row, token in enumerate(last):
            if row in self.stopped_at:
                done[row] = True
            elif token in self.eos_ids:
                self.ended.add(row)
            elif row not in self.ended:
                live.append(row)
        if live:
            tails = self.tokenizer.batch_decode(generated[live, -self.window :].tolist())
            for row, tail in zip(live, tails):
                if any(stop in tail for stop in self.stops):
                    self.stopped_at[row] = step
                    done[row] = True
        return done
