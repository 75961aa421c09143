"""The default backend: the policy model itself decodes (no weight sync).

All prompts go through one left-padded batch with a KV cache (or chunks of ``max_batch_size``,
sorted by length so chunks pad little). The keys and values of each finished sequence are kept
(``algos.generation.prefix_cache``) so that a later turn of the same episode, or a group's copies
of one prompt, are not prefilled again.

The decode loop is ours rather than ``model.generate``'s because a turn ends at different steps in
different rows (most at the closing code fence, a few at the token limit): ``generate`` computes
every row until the longest ends, while here a finished row leaves the batch, and on a CPU a
decode step's cost grows with the rows it computes. Each sampled token's logprob is recorded as
``log_softmax(logits / T)`` from the raw logits, before top-p.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, TopPLogitsWarper

from algos.generation.base import Completion, Generator, SamplingParams, check_prompts
from algos.generation.prefix_cache import (
    Layout,
    PrefixCache,
    cache_kwarg,
    left_pad,
    supports_prefix_reuse,
)

logger = logging.getLogger(__name__)


class HFGenerator(Generator):
    """Batched decoding returning exact sampled ids and their sampling logprobs.

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
        self.rows_droppable = supports_prefix_reuse(model)
        self.prefix = (PrefixCache(model, prefix_cache_bytes)
                       if prefix_cache_bytes and self.rows_droppable else None)

    def update_weights(self, model) -> None:
        """Sampling reads the model itself; kept states go, in case its weights were replaced in
        a way that left their tensor versions alone (``param.data = ...``)."""
        if self.prefix is not None:
            self.prefix.clear()

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
        width = max(len(p) for p in prompts)
        input_ids, attention_mask = left_pad(prompts, width, self.pad_id)
        layout = self._reuse(prompts, width)
        if self.prefix is not None:  # this call's rows replace the entries they start from
            for prompt in prompts:
                key, _ = self.prefix.longest_prefix(prompt)
                if key is not None:
                    self.prefix.discard(key)
        decode = _Decode(self.model, layout, input_ids, attention_mask, self.rows_droppable)
        sampler = _Sampler(params)
        stops = _StopStrings(self.tokenizer, params.stop)
        generated: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        logits = decode.prefill()
        for step in range(params.max_new_tokens):
            tokens, token_logprobs = sampler(logits)
            finished = []
            for i, row in enumerate(decode.rows):
                if reasons[row] is not None:  # a finished row that its cache could not drop
                    continue
                token = tokens[i]
                generated[row].append(token)
                logprobs[row].append(token_logprobs[i])
                if token in self.eos_ids:
                    reasons[row] = "eos"
                elif stops.hit(generated[row]):
                    reasons[row] = "stop"
                elif step == params.max_new_tokens - 1:
                    reasons[row] = "length"
                if reasons[row] is not None:
                    finished.append(i)
            if self.prefix is not None:  # all but the last sampled token, which was never fed
                for i in finished:
                    row = decode.rows[i]
                    self.prefix.keep(decode.cache, i, decode.start(row),
                                     prompts[row] + generated[row][:-1])
            if all(reasons[row] is not None for row in decode.rows):
                break
            logits = decode.step(tokens, finished, self.pad_id)
        return [Completion(token_ids=ids, logprobs=lps, finish_reason=reason,
                           text=self.tokenizer.decode(ids, skip_special_tokens=True))
                for ids, lps, reason in zip(generated, logprobs, reasons)]

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


class _Decode:
    """A batch's forward passes: the prefill of what ``layout`` does not cover, then one token a
    step for the rows still running. A row that finishes leaves the batch (its keys and values
    are cut from the cache), so later steps compute only the live rows; with a cache that cannot
    drop rows (``droppable`` False) finished rows are fed padding and ignored instead."""

    def __init__(self, model: PreTrainedModel, layout: Layout, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, droppable: bool):
        self.model = model
        self.layout = layout
        self.cache = layout.cache or DynamicCache(config=model.config)
        self.cache_kwarg = cache_kwarg(model)
        self.device = model.device
        self.input_ids = input_ids.to(self.device)
        self.mask = attention_mask.to(self.device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.width = input_ids.shape[1]
        self.droppable = droppable
        self.rows = list(range(input_ids.shape[0]))  # the prompt index of each row still here
        self.prompt_lengths = attention_mask.sum(-1).tolist()

    def start(self, row: int) -> int:
        """The first cache column of prompt ``row`` (the ones before are its left padding)."""
        return self.width - self.prompt_lengths[row]

    def prefill(self) -> torch.Tensor:
        fed = self.layout.length
        return self._forward(self.input_ids[:, fed:], self.positions[:, fed:], logits_to_keep=1)

    def step(self, tokens: list[int], finished: list[int], pad_id: int) -> torch.Tensor:
        """Feed each live row its sampled token; ``finished`` (batch indices) leave first."""
        tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if finished and self.droppable:
            gone = set(finished)
            kept = [i for i in range(len(self.rows)) if i not in gone]
            keep = torch.tensor(kept, device=self.device)
            self.cache.batch_select_indices(keep)
            self.rows = [self.rows[i] for i in kept]
            self.mask, self.positions, tokens = self.mask[keep], self.positions[keep], tokens[keep]
        elif finished:
            tokens[finished] = pad_id
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(tokens[:, None], self.positions)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **{self.cache_kwarg: self.cache}, **kwargs)
        return out.logits[:, -1].float()


class _Sampler:
    """Samples the next token of each row and its logprob under the sampling convention:
    ``log_softmax(logits / T)`` at the sampled id, before top-p (greedy: T = 1)."""

    def __init__(self, params: SamplingParams):
        self.greedy = params.greedy
        self.temperature = 1.0 if params.greedy else params.temperature
        self.top_p = params.top_p

    def __call__(self, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        scaled = logits / self.temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        if self.greedy:
            tokens = logits.argmax(dim=-1)
        else:
            if self.top_p < 1.0:
                scaled = TopPLogitsWarper(self.top_p)(None, scaled)
            tokens = torch.multinomial(torch.softmax(scaled, dim=-1), num_samples=1).squeeze(1)
        return tokens.tolist(), logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()


class _StopStrings:
    """Whether a sequence's generated text has just completed a stop string.

    Only a short tail of ids is decoded per step: a stop string completed by the newest token lies
    within its last ``len(stop bytes)`` tokens, since every token is at least one byte.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.window = max((len(s.encode()) for s in stops), default=0) + 2

    def hit(self, ids: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tokenizer.decode(ids[-self.window :])
        return any(stop in tail for stop in self.stops)
