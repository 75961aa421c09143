"""The default backend: transformers' ``generate`` on the policy model itself (no weight sync).

All prompts go through one left-padded batch with a KV cache (or chunks of ``max_batch_size``,
sorted by length so chunks pad little). The keys and values of each finished sequence are kept
(``algos.generation.prefix_cache``) so that a later turn of the same episode, or a group's copies
of one prompt, are not prefilled again. Two small hooks ride along inside ``generate``:

- a logits processor records each sampled token's logprob, ``log_softmax(logits / T)``, from the
  raw logits before temperature and top-p are applied (those run after it, as our own warpers), so
  memory stays one ``[batch, vocab]`` tensor instead of ``output_logits``' ``[steps, batch, vocab]``;
- a stopping criterion ends each sequence on its own once its generated text contains a stop string.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

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
from algos.generation.prefix_cache import Layout, PrefixCache, left_pad

logger = logging.getLogger(__name__)


class HFGenerator(Generator):
    """Batched ``model.generate`` returning exact sampled ids and their sampling logprobs.

    ``model`` must be the unwrapped causal LM that the trainer updates (not a DDP/accelerate
    wrapper, and for PPO ``PolicyWithValue.policy``); since it is the same object,
    ``update_weights`` has nothing to do.

    ``prefix_cache_bytes`` bounds the keys and values kept between calls (0 keeps none); kept
    states are dropped as soon as any parameter of the model changes in place.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int | None = None,
        prefix_cache_bytes: int = 1 << 30,
    ):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {prefix_cache_bytes}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        prefix = PrefixCache(model, prefix_cache_bytes) if prefix_cache_bytes else None
        self.prefix = prefix if prefix is not None and prefix.supported else None

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
        input_ids, attention_mask = left_pad(prompts, width, self.pad_id)
        layout = self._reuse(prompts, width)

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
        cache = {self.prefix.cache_kwarg: layout.cache} if layout.cache is not None else {}
        try:
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stopper] if stopper else []),
                return_dict_in_generate=True,
                **cache,
            )
        finally:
            self.model.generation_config = model_config
        generated = output.sequences[:, width:]
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
        if self.prefix is not None:
            self._keep(output, prompts, completions, width)
        return completions

    def _reuse(self, prompts: list[list[int]], width: int) -> Layout:
        """The batch's cache from kept states; a prompt that several rows share (a group's
        samples) is prefilled here once, up to its last token."""
        if self.prefix is None:
            return Layout(None, 0)
        self.prefix.sync_weights()
        shared = [list(p[:-1]) for p, n in Counter(map(tuple, prompts)).items()
                  if n > 1 and len(p) > 1 and self.prefix.longest_prefix(list(p))[1] < len(p) - 1]
        if shared:
            self.prefix.prefill(shared, self.pad_id)
        return self.prefix.assemble(prompts, width)

    def _keep(self, output, prompts: list[list[int]], completions: list[Completion],
              width: int) -> None:
        """Keep each row's prompt and completion states (all but the last sampled token, which
        was never fed back), in place of the shorter ones this call started from."""
        cache = getattr(output, self.prefix.cache_kwarg, None)
        if cache is None:
            return
        for prompt in prompts:
            key, _ = self.prefix.longest_prefix(prompt)
            if key is not None:
                self.prefix.discard(key)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            self.prefix.keep(cache, row, width - len(prompt), prompt + completion.token_ids[:-1])


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
