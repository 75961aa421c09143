"""Keys and values of finished sequences, kept between ``generate`` calls so a later prompt that
extends one is not prefilled again.

A multi-turn episode's next prompt is its last prompt, the completion and the tool's output, so
all but the new tail is already in the KV cache of the call that sampled the completion; and a
group's samples share one prompt, whose prefill is done once and copied. On CPU the prefill of
those contexts is most of a rollout's compute.

Each entry holds one sequence's keys and values, ``[layers, 2, kv_heads, tokens, head_dim]``, for
its tokens at positions ``0 .. n-1`` (positions come from the attention mask, so they do not depend
on the padding of the batch that made them). ``assemble`` lays a batch's entries out left-padded
into one ``DynamicCache``: the cache ends at the first column where some row has nothing cached,
and the model recomputes every row from there (``generate`` feeds only the uncached columns).

The weights that made an entry are part of it: an in-place change to any parameter (an optimizer
step, ``load_state_dict``) bumps its tensor version, and the store empties itself when the versions
change. Models whose cache is not a plain ``DynamicLayer`` per layer (sliding windows, linear
attention, quantized caches) are not cached.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


@dataclass
class Layout:
    """A batch's cache: ``cache`` covers columns ``[0, length)`` of the left-padded prompts."""

    cache: DynamicCache | None
    length: int


class PrefixCache:
    """Per-sequence KV caches up to ``max_bytes``, least recently used evicted first."""

    def __init__(self, model: PreTrainedModel, max_bytes: int):
        self.model = model
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self._weights_version: tuple[int, ...] | None = None
        self.cache_kwarg = cache_kwarg(model)

    def sync_weights(self) -> None:
        """Drop every entry when any parameter changed since the entries were made."""
        version = tuple(p._version for p in self.model.parameters())
        if version != self._weights_version:
            self.clear()
            self._weights_version = version

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def longest_prefix(self, prompt: list[int]) -> tuple[tuple[int, ...] | None, int]:
        """The entry covering most of ``prompt[:-1]`` (its last token is always fed) and how many
        of its tokens that is."""
        best, length = None, 0
        for key in self.entries:
            if length < len(key) < len(prompt) and tuple(prompt[: len(key)]) == key:
                best, length = key, len(key)
        if best is not None:
            self.entries.move_to_end(best)
        return best, length

    def put(self, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        if not tokens or kv.numel() * kv.element_size() > self.max_bytes:
            return
        self.discard(tokens)
        self.entries[tokens] = kv
        self.bytes += kv.numel() * kv.element_size()
        while self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()

    def discard(self, tokens: tuple[int, ...]) -> None:
        old = self.entries.pop(tokens, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()

    def assemble(self, prompts: list[list[int]], width: int) -> Layout:
        """The cache for ``prompts`` left-padded to ``width``, from the longest entry of each."""
        found = [self.longest_prefix(p) for p in prompts]
        length = min(width - len(p) + cached for p, (_, cached) in zip(prompts, found))
        if length <= 0:
            return Layout(None, 0)
        some = next(self.entries[key] for key, _ in found if key is not None)
        layers, _, heads, _, dim = some.shape
        kv = some.new_zeros((layers, 2, len(prompts), heads, length, dim))
        for row, (prompt, (key, _)) in enumerate(zip(prompts, found)):
            start = width - len(prompt)  # columns before it are padding
            if start < length:
                kv[:, :, row, :, start:] = self.entries[key][:, :, :, : length - start]
        return Layout(DynamicCache([(kv[i, 0], kv[i, 1]) for i in range(layers)],
                                   config=self.model.config), length)

    @torch.no_grad()
    def prefill(self, sequences: list[list[int]], pad_id: int) -> None:
        """Compute and keep the states of each of ``sequences``, starting from what is kept."""
        width = max(len(s) for s in sequences)
        input_ids, attention_mask = left_pad(sequences, width, pad_id)
        layout = self.assemble(sequences, width)
        cache = layout.cache or DynamicCache(config=self.model.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        device = self.model.device
        self.model(input_ids=input_ids[:, layout.length :].to(device),
                   attention_mask=attention_mask.to(device),
                   position_ids=positions[:, layout.length :].to(device),
                   use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache})
        for row, sequence in enumerate(sequences):
            self.keep(cache, row, width - len(sequence), sequence)

    def keep(self, cache: DynamicCache, row: int, start: int, tokens: list[int]) -> None:
        """Store the states of ``tokens``, which ``cache``'s row ``row`` holds from column
        ``start`` on."""
        self.put(tuple(tokens), row_states(cache, row, start, start + len(tokens)))


def cache_kwarg(model: PreTrainedModel) -> str:
    """The name ``model.forward`` takes its KV cache by (``past_key_values`` in older 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def supports_prefix_reuse(model: PreTrainedModel) -> bool:
    """Whether the model's cache is one ``DynamicLayer`` per layer, which rows can be cut from."""
    try:
        layers = DynamicCache(config=model.config).layers
    except (AttributeError, TypeError, ValueError):
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with each prompt right-aligned in ``width`` columns."""
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def row_states(cache: DynamicCache, row: int, start: int, stop: int) -> torch.Tensor:
    """Row ``row``'s keys and values at columns ``[start, stop)``, ``[layers, 2, heads, n, dim]``."""
    return torch.stack([torch.stack((layer.keys[row, :, start:stop], layer.values[row, :, start:stop]))
                        for layer in cache.layers])
