"""Text generation backends behind one interface (see ``base``): ``hf`` (default),
``hf-continuous`` (transformers' continuous batching, for asynchronous multi-turn rollouts),
``vllm`` (optional extra, GPU machines), ``openai`` (an OpenAI-compatible server; training needs
vLLM's weight reload) and ``vllm-server`` (a vLLM server started from its own venv and reloaded
after each update).

    gen = make_generator("hf", model=model, tokenizer=tokenizer)
    [c] = gen.generate([prompt_ids], SamplingParams(max_new_tokens=256, stop=("```\\n",)))

Backends other than ``hf`` import their heavy dependencies only when selected.
"""

from __future__ import annotations

from collections.abc import Callable

from algos.generation.base import (
    Completion,
    FinishReason,
    GenerationError,
    Generator,
    SamplingParams,
)
from tir_envs.registry import Registry

GENERATORS: Registry[Callable[..., Generator]] = Registry("generation backend")
"""Backend name -> a factory taking the backend's constructor arguments; a factory imports its
backend's module (and heavy dependencies) only when called."""


@GENERATORS.register("hf")
def _hf(**kwargs) -> Generator:
    from algos.generation.hf import HFGenerator

    return HFGenerator(**kwargs)


@GENERATORS.register("hf-continuous")
def _hf_continuous(**kwargs) -> Generator:
    from algos.generation.hf_continuous import ContinuousHFGenerator

    return ContinuousHFGenerator(**kwargs)


@GENERATORS.register("vllm")
def _vllm(**kwargs) -> Generator:
    from algos.generation.vllm import VLLMGenerator

    return VLLMGenerator(**kwargs)


@GENERATORS.register("openai")
def _openai(**kwargs) -> Generator:
    from algos.generation.openai import OpenAIGenerator

    return OpenAIGenerator(**kwargs)


@GENERATORS.register("vllm-server")
def _vllm_server(**kwargs) -> Generator:
    from algos.generation.server import VLLMServerGenerator

    return VLLMServerGenerator(**kwargs)


BACKENDS = GENERATORS.names()
"""The built-in backends."""


def make_generator(backend: str = "hf", **kwargs) -> Generator:
    """Build a backend by name; ``kwargs`` go to its constructor (``HFGenerator``,
    ``ContinuousHFGenerator``, ``VLLMGenerator``, ``OpenAIGenerator`` or
    ``VLLMServerGenerator``)."""
    return GENERATORS.get(backend)(**kwargs)


__all__ = [
    "BACKENDS",
    "GENERATORS",
    "Completion",
    "FinishReason",
    "GenerationError",
    "Generator",
    "SamplingParams",
    "make_generator",
]
