"""Tiny models for tests and CPU benchmarks: a small Llama built with ``from_config`` and a byte-level BPE tokenizer
trained here on a built-in math/python corpus, so tests need no download and run in seconds.

The defaults match the tiny model of DESIGN.md's numbers (vocab 1024, ~1.3M parameters). The
tokenizer speaks ChatML like SmolLM2 (``<|im_start|>``/``<|im_end|>``, eos = ``<|im_end|>``) but has
a separate pad token, so code that confuses pad with eos shows up in tests.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Procedural math-and-python text, varied enough to fill ~1k BPE merges."""
    rng = random.Random(seed)
    names = ["x", "y", "n", "total", "count", "result", "value", "a", "b", "answer", "items"]
    words = (
        "the of and a to is in what find compute sum product number numbers how many remainder "
        "when divided by prime integer positive solve equation let be value each has apples "
        "total cost price per hour minutes speed distance area square circle radius triangle "
        "probability digits greatest common divisor least multiple answer therefore so we get "
        "system user assistant"
    ).split()
    ops = ["+", "-", "*", "//", "%", "**"]
    texts = []
    for _ in range(n):
        a, b, c = rng.randint(0, 999), rng.randint(1, 99), rng.randint(2, 12)
        v = rng.choice(names)
        op = rng.choice(ops)
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16)))
        texts.append(
            f"user\n{sentence.capitalize()}? What is {a} {op} {b}?\n"
            f"assistant\nLet me compute it with Python.\n```python\n{v} = {a} {op} {b}\n"
            f"for i in range({c}):\n    {v} = ({v} + i) % {b}\nprint({v})\n```\n"
            f"```output\n{(a + b) % b}\n```\n"
            f"So the answer is $\\boxed{{{a % b}}}$.\n"
            f"import math\nprint(math.gcd({a}, {b}), sum(range({c})))\n"
            f"def f(n):\n    return n * (n + 1) // 2\n\nprint(f({c}))\n"
        )
    return texts


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A fresh tokenizer (trained once per process, then rebuilt from JSON in milliseconds)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast | None = None, **overrides) -> LlamaConfig:
    tokenizer = tokenizer or tiny_tokenizer()
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, **overrides):
    """A freshly initialised tiny Llama; the seed fixes the weights without touching global RNG."""
    config = tiny_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = config.bos_token_id, config.eos_token_id
    generation.pad_token_id = config.pad_token_id
    return model.eval()


def save_tiny(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as an HF directory (what ``load_policy`` takes)."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    tiny_model(seed, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def teach(
    model, pairs: list[tuple[list[int], list[int]]], max_steps: int = 300, lr: float = 3e-3
):
    """Fit ``model`` to continue each prompt with its completion (loss on completion ids only),
    giving tests a tiny model with predictable output, e.g. a turn that ends in a code fence.
    Stops once the loss is low enough for greedy decoding to reproduce the completions."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(pairs):
        seq = list(prompt) + list(completion)
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) : len(seq)] = torch.tensor(completion)
        mask[row, : len(seq)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    with torch.random.fork_rng(devices=[]):
        for _ in range(max_steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if loss.item() < 0.05:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
