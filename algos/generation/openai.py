"""An OpenAI-compatible completions endpoint (vLLM, SGLang, llama.cpp server, ...), for evaluation.

Prompts go as token-id arrays in one ``/v1/completions`` request. The exact generated ids come
back only from servers that honour vLLM's ``return_tokens_as_token_ids`` (tokens read
``"token_id:123"``); from others, ``token_ids`` is the re-tokenized text and ``logprobs`` are
NaN, which is fine for scoring answers and not for training. Stdlib HTTP only: no extra package.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request

from algos.generation.base import Completion, Generator, SamplingParams, check_prompts

logger = logging.getLogger(__name__)


class OpenAIGenerator(Generator):
    """``base_url`` like ``http://127.0.0.1:8000/v1``; ``model`` is the served model name.

    ``tokenizer`` (optional) re-tokenizes the text when the server returns no token ids.
    ``extra_body`` is merged into every request (server-specific sampling options).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        tokenizer=None,
        api_key: str | None = None,
        timeout: float = 600.0,
        extra_body: dict | None = None,
    ):
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.tokenizer = tokenizer
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        check_prompts(prompts)
        if not prompts:
            return []
        body = {
            "model": self.model,
            "prompt": [list(p) for p in prompts],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
            "include_stop_str_in_output": True,
            **({"stop": list(params.stop)} if params.stop else {}),
            **({"seed": params.seed} if params.seed is not None else {}),
            **self.extra_body,
        }
        choices = sorted(self._post(body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise RuntimeError(f"server returned {len(choices)} choices for {len(prompts)} prompts")
        return [self._completion(choice, params) for choice in choices]

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{self.url} answered HTTP {exc.code}: {detail}") from exc

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
