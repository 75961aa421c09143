"""Optional vLLM backend for GPU machines (``pip install .[vllm]``); vllm is imported only here.

Untested on this project's CPU machines: it follows vLLM's documented offline API
(``LLM.generate`` with token prompts) and TRL's colocated weight sync, which reaches into vLLM
internals and so may need adjusting when vLLM changes.

Logprobs use vLLM's ``logprobs_mode="processed_logprobs"``: ``log_softmax(logits / T)`` like
``hf``, except that with ``top_p < 1`` vLLM reports the truncated (renormalized) distribution.
"""

from __future__ import annotations

import logging
import os

from algos.generation.base import Completion, Generator, SamplingParams, check_prompts

logger = logging.getLogger(__name__)


class VLLMGenerator(Generator):
    """A colocated vLLM engine loaded from an HF model directory.

    ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization=0.3``, ``dtype="bfloat16"``).
    """

    def __init__(self, model: str | os.PathLike, **engine_kwargs):
        # The engine must live in this process for update_weights to reach its model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as exc:
            raise ImportError("the vllm backend needs vLLM: pip install '.[vllm]'") from exc
        self._vllm = vllm
        engine_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = vllm.LLM(model=os.fspath(model), **engine_kwargs)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        check_prompts(prompts)
        if not prompts:
            return []
        # One seed per prompt: vLLM seeds each request's own generator, so a shared seed would
        # give every copy of a prompt in a GRPO group the same sample.
        sampling = [
            self._vllm.SamplingParams(
                n=1,
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=list(params.stop) or None,
                include_stop_str_in_output=True,
                seed=None if params.seed is None else params.seed + i,
                logprobs=0,  # the sampled token's logprob only
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], sampling, use_tqdm=False
        )
        completions = []
        for out in outputs:
            seq = out.outputs[0]
            ids = list(seq.token_ids)
            logprobs = [step[token].logprob for step, token in zip(seq.logprobs, ids)]
            if seq.finish_reason == "length":
                reason = "length"
            else:  # vLLM says "stop" for both; stop_reason is the matched string, None for eos
                reason = "stop" if isinstance(seq.stop_reason, str) else "eos"
            completions.append(Completion(ids, logprobs, seq.text, reason))
        return completions

    def update_weights(self, model) -> None:
        """Copy the trained model's weights into the engine (TRL's colocate approach)."""
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.model.load_weights(model.state_dict().items())
        self.llm.reset_prefix_cache()  # cached KV blocks came from the old weights
