"""An OpenAI-compatible completions endpoint (vLLM, SGLang, llama.cpp server, ...): evaluation
everywhere, training rollouts on vLLM.

Each prompt goes as a token-id array in its own ``/v1/completions`` request, all in flight at
once, so the server's continuous batching sees them together and a seeded call gives prompt ``i``
the seed ``seed + i`` (one request with a seed would give every copy of a prompt in a GRPO group
the same sample). The exact generated ids come back only from servers that honour vLLM's
``return_tokens_as_token_ids`` (tokens read ``"token_id:123"``); from others, ``token_ids`` is
the re-tokenized text and ``logprobs`` are NaN, which is fine for scoring answers and not for
training. Logprobs follow ``algos.generation.base`` when vLLM runs with
``--logprobs-mode processed_logprobs`` (``log_softmax(logits / T)``; its default reports the raw
``log_softmax(logits)``).

A server that refuses the connection, drops it, times out or answers 5xx raises
``GenerationError`` (the rollout ends those episodes as infra errors); a 4xx answer means a bad
request and raises ``RuntimeError``.

``update_weights`` (training) needs vLLM started with ``VLLM_SERVER_DEV_MODE=1`` and a
``weights_dir`` both processes can read: it saves the policy there as safetensors, then
``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": weights_dir}}``
and ``POST /reset_prefix_cache`` (cached KV blocks came from the old weights). That goes through
the disk, which is what a CPU server or a server on another machine with a shared filesystem
can do. On GPUs, vLLM also moves weights in memory: ``POST /init_weight_transfer_engine`` once
(an NCCL group between trainer and server), then per update ``/pause``,
``/start_weight_update``, ``/update_weights`` (the trainer broadcasts each tensor),
``/finish_weight_update``, ``/resume``. This project does not use or test that path: it needs
CUDA and NCCL, which these CPU machines do not have.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from algos.generation.base import (
    Completion,
    GenerationError,
    Generator,
    SamplingParams,
    check_prompts,
)

logger = logging.getLogger(__name__)

MAX_CONCURRENT_REQUESTS = 256
"""Requests in flight at once; the server queues the rest of its batch itself."""


class OpenAIGenerator(Generator):
    """``base_url`` like ``http://127.0.0.1:8000/v1``; ``model`` is the served model name
    (``None``: the server's only one, asked from ``/v1/models``).

    ``tokenizer`` (optional) re-tokenizes the text when the server returns no token ids.
    ``extra_body`` is merged into every request (server-specific sampling options).
    ``weights_dir`` enables ``update_weights`` on a vLLM server (see the module docstring).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        tokenizer=None,
        api_key: str | None = None,
        timeout: float = 600.0,
        extra_body: dict | None = None,
        weights_dir: str | os.PathLike | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        # absolute: the server resolves it, from its own working directory
        self.weights_dir = Path(weights_dir).resolve() if weights_dir is not None else None
        self.model = model if model is not None else self._served_model()

    @property
    def server_root(self) -> str:
        """The server's own routes (``/health``, ``/collective_rpc``) sit beside ``/v1``."""
        return self.base_url.removesuffix("/v1")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        check_prompts(prompts)
        if not prompts:
            return []
        body = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
            "include_stop_str_in_output": True,
            **({"stop": list(params.stop)} if params.stop else {}),
            **self.extra_body,
        }
        bodies = [
            {**body, "prompt": list(prompt),
             **({"seed": params.seed + i} if params.seed is not None else {})}
            for i, prompt in enumerate(prompts)
        ]
        url = self.base_url + "/completions"
        with ThreadPoolExecutor(min(len(bodies), MAX_CONCURRENT_REQUESTS)) as pool:
            answers = list(pool.map(lambda b: self._post(url, b), bodies))
        for answer in answers:
            if len(answer.get("choices") or ()) != 1:
                raise RuntimeError(f"{url} returned {len(answer.get('choices') or ())} choices "
                                   "for one prompt")
        return [self._completion(answer["choices"][0], params) for answer in answers]

    def update_weights(self, model) -> None:
        """Save ``model`` to ``weights_dir`` and have the vLLM server reload it from there."""
        if self.weights_dir is None:
            raise RuntimeError(
                "this OpenAI-compatible server cannot follow training: pass weights_dir= (a "
                "directory the vLLM server can read) so update_weights can reload it"
            )
        save_for_vllm(model, self.weights_dir)
        self.reload_weights()

    def reload_weights(self) -> None:
        """Have the server load the weights saved in ``weights_dir`` and drop its KV cache."""
        try:
            self._post(self.server_root + "/collective_rpc",
                       {"method": "reload_weights",
                        "kwargs": {"weights_path": os.fspath(self.weights_dir)}})
            self._post(self.server_root + "/reset_prefix_cache", None)
        except GenerationError:
            raise
        except RuntimeError as exc:  # 4xx: the routes are missing or refused the path
            raise RuntimeError(f"{exc}\nweight reloads need a vLLM server started with "
                               f"VLLM_SERVER_DEV_MODE=1 that can read {self.weights_dir}") from exc

    def _served_model(self) -> str:
        names = [m["id"] for m in self._request(self.base_url + "/models", None)["data"]]
        if len(names) != 1:
            raise ValueError(f"{self.base_url} serves {names}: pass the model name")
        return names[0]

    def _post(self, url: str, body: dict | None) -> dict:
        return self._request(url, json.dumps(body or {}).encode())

    def _request(self, url: str, data: bytes | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data, headers, method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            error = GenerationError if exc.code >= 500 else RuntimeError
            raise error(f"{url} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            # refused, reset, closed mid-answer, timed out: the server, not the request, failed
            raise GenerationError(f"{url} failed: {exc}") from exc
        return json.loads(text) if text.strip() else {}

    def _completion(self, choice: dict, params: SamplingParams) -> Completion:
        text = choice.get("text") or ""
        tokens = (choice.get("logprobs") or {}).get("tokens") or []
        if tokens and all(t.startswith("token_id:") for t in tokens):
            ids = [int(t.removeprefix("token_id:")) for t in tokens]
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        elif self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            logprobs = [math.nan] * len(ids)
        else:
            raise RuntimeError(
                "the server returned no token ids (it ignores return_tokens_as_token_ids); "
                "pass tokenizer= to re-tokenize its text"
            )
        if choice.get("finish_reason") == "length":
            reason = "length"
        else:  # "stop" covers eos and stop strings; vLLM names the matched string in stop_reason
            stop_reason = choice.get("stop_reason")
            hit = isinstance(stop_reason, str) or any(s in text for s in params.stop)
            reason = "stop" if hit else "eos"
        return Completion(ids, logprobs, text, reason)


def save_for_vllm(model, weights_dir: str | os.PathLike) -> None:
    """``model``'s config and weights (one safetensors file) as vLLM loads and reloads them.

    A tied LM head is written out as a tensor of its own, under a config that unties it: vLLM
    skips a tied ``lm_head.weight`` when it reloads, and on CPU the head computes from a copy
    made at load time, so the served model would keep sampling from the old head.
    """
    import copy

    from safetensors.torch import save_file

    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    config.save_pretrained(weights_dir)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if tensor.data_ptr() in seen:  # the tied head: safetensors stores no shared memory
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.contiguous()
    save_file(tensors, weights_dir / "model.safetensors", metadata={"format": "pt"})
