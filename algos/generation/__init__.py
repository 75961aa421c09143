"""Text generation backends behind one interface (see ``base``): ``hf`` (default), ``vllm``
(optional extra, GPU machines) and ``openai`` (an OpenAI-compatible server, for evaluation).

    gen = make_generator("hf", model=model, tokenizer=tokenizer)
    [c] = gen.generate([prompt_ids], SamplingParams(max_new_tokens=256, stop=("```\\n",)))

Backends other than ``hf`` import their heavy dependencies only when selected.
"""

from __future__ import annotations

from algos.generation.base import Completion, FinishReason, Generator, SamplingParams

BACKENDS = ("hf", "vllm", "openai")


def make_generator(backend: str = "hf", **kwargs) -> Generator:
    """Build a backend by name; ``kwargs`` go to its constructor (``HFGenerator``,
    ``VLLMGenerator`` or ``OpenAIGenerator``)."""
    if backend == "hf":
        from algos.generation.hf import HFGenerator

        return HFGenerator(**kwargs)
    if backend == "vllm":
        from algos.generation.vllm import VLLMGenerator

        return VLLMGenerator(**kwargs)
    if backend == "openai":
        from algos.generation.openai import OpenAIGenerator

        return OpenAIGenerator(**kwargs)
    raise ValueError(f"unknown generation backend {backend!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Completion", "FinishReason", "Generator", "SamplingParams", "make_generator"]
