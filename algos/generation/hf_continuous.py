"""transformers' continuous batching on the policy model: every live episode's turn in one batch.

``model.init_continuous_batching`` runs a background loop over a paged KV cache: requests join the
running batch whenever they arrive and leave it the step they finish, and complete cache blocks are
shared by prefix, so a group's samples prefill their common prompt once and a later turn reuses the
cache of the turns before it. Each ``generate`` call adds its prompts as requests and waits for
them, and calls may come from many threads at once (``concurrency``): the rollout sends each
episode's turn the moment its observation is back.

What the engine does not do is done here, on its streamed tokens: a request ends at the token that
completes a stop string (the request is cancelled there), and the sampling logprobs come from the
engine (``return_logprobs``: ``log(softmax(logits / T))`` at the sampled id, which is the base
convention while ``top_p`` is 1; top-p is refused, since the engine reports it truncated).

The engine's paged cache holds keys and values computed with the weights of its session: a session
ends when the weights change (``update_weights``), when the sampling settings change, and on
``close``. Starting one seeds torch's global RNG with ``SamplingParams.seed`` (the engine samples
from it in its own thread). Which requests share a decode step depends on when env steps return, so
sampled episodes are not reproducible run to run the way a seeded ``hf`` call is.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from algos.generation.base import (
    Completion,
    GenerationError,
    Generator,
    SamplingParams,
    check_prompts,
)
from algos.generation.hf import eos_token_ids


class ContinuousHFGenerator(Generator):
    """Continuous batching over a paged KV cache, returning exact sampled ids and their logprobs.

    ``model`` is the unwrapped causal LM the trainer updates, as for ``HFGenerator``.
    ``page_size`` tokens make a cache block (prefixes are shared whole blocks at a time);
    ``num_blocks`` bounds the cache (``num_blocks * page_size`` tokens across live requests, cached
    prefixes are evicted first); ``max_batch_tokens`` bounds one forward pass (decode tokens plus
    prefill chunks).
    """

    concurrency = 1024

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        page_size: int = 32,
        num_blocks: int = 512,
        max_batch_tokens: int = 256,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.page_size = page_size
        self.num_blocks = num_blocks
        self.max_batch_tokens = max_batch_tokens
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._lock = threading.Lock()
        self._manager = None
        self._session_key: tuple | None = None
        self._was_training = False
        self._requests: dict[str, _Request] = {}
        self._reader: threading.Thread | None = None
        self._counter = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        check_prompts(prompts)
        if params.top_p < 1.0:
            raise ValueError("the continuous-batching backend reports logprobs after top-p "
                             "truncation; use top_p=1 or the hf backend")
        if not prompts:
            return []
        with self._lock:
            self._ensure_session(params)
            futures = [self._add(list(p), params) for p in prompts]
        return [f.result() for f in futures]

    def update_weights(self, model) -> None:
        """The cache was computed with the old weights: end the session."""
        self._end_session()

    def close(self) -> None:
        self._end_session()

    # ------------------------------------------------------------------ session

    def _ensure_session(self, params: SamplingParams) -> None:
        key = (params.greedy, params.temperature, params.seed)
        if self._manager is not None and key == self._session_key and self._manager.is_running():
            return
        if self._requests:
            raise RuntimeError("sampling settings changed while requests are in flight")
        self._stop_manager()
        self._was_training = self.model.training
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(
            eos_token_id=self.eos_ids,
            pad_token_id=self.eos_ids[0] if pad is None else pad,
            do_sample=not params.greedy,
            temperature=None if params.greedy else params.temperature,
            top_k=None if params.greedy else 0,
            top_p=None,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size,
            num_blocks=self.num_blocks,
            max_batch_tokens=self.max_batch_tokens,
            return_logprobs=True,
            seed=params.seed,
            allow_block_sharing=True,
        )
        manager = self.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=cb_config
        )
        manager.start()
        self._manager, self._session_key = manager, key
        self._reader = threading.Thread(target=self._read, args=(manager,), daemon=True,
                                        name="cb-results")
        self._reader.start()

    def _end_session(self) -> None:
        with self._lock:
            self._stop_manager()

    def _stop_manager(self) -> None:
        manager, self._manager, self._session_key = self._manager, None, None
        if manager is None:
            return
        manager.stop(block=True)
        manager.destroy()
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        self._fail_all(GenerationError("the continuous-batching session ended"))
        self.model.train(self._was_training)

    # ------------------------------------------------------------------ requests

    def _add(self, prompt: list[int], params: SamplingParams) -> Future:
        request_id = f"r{self._counter}"
        self._counter += 1
        request = _Request(self.tokenizer, params, self.eos_ids)
        self._requests[request_id] = request
        added = self._manager.add_request(
            input_ids=prompt, request_id=request_id, max_new_tokens=params.max_new_tokens,
            streaming=bool(params.stop), eos_token_id=self.eos_ids,
        )
        if added is None:
            self._requests.pop(request_id)
            request.future.set_exception(GenerationError("the engine refused the request"))
        return request.future

    def _read(self, manager) -> None:
        """Route the engine's streamed outputs to their requests until its loop stops."""
        while manager.is_running() or not manager.output_router.output_queue.empty():
            output = manager.get_result(timeout=0.1)
            if output is None:
                continue
            request = self._requests.get(output.request_id)
            if request is None:  # cancelled at a stop string; the engine may stream one more
                continue
            if output.error is not None:
                self._finish(output.request_id, exception=GenerationError(output.error))
            elif request.update(output.generated_tokens, output.logprobs, output.is_finished()):
                if not output.is_finished():
                    manager.cancel_request(output.request_id)
                self._finish(output.request_id)
        error = manager.background_thread_status.fatal_error
        if error is not None:
            self._fail_all(GenerationError(f"the continuous-batching loop died: {error}"))

    def _finish(self, request_id: str, exception: Exception | None = None) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if exception is not None:
            request.future.set_exception(exception)
        else:
            request.future.set_result(request.completion())

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._requests):
            self._finish(request_id, exception=error)


class _Request:
    """One request's streamed tokens: where it ends (eos, a stop string, or the length limit).

    A stop string completed by token ``k`` lies within the last ``len(stop bytes)`` tokens up to
    ``k`` (every token is at least one byte), so each new token decodes only that short tail.
    """

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.eos_ids = set(eos_ids)
        self.window = max((len(s.encode()) for s in params.stop), default=0) + 2
        self.future: Future = Future()
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.reason = "length"
        self.checked = 0

    def update(self, token_ids: list[int], logprobs: list[float], finished: bool) -> bool:
        """Take the tokens streamed so far; True once the request has ended."""
        for k in range(self.checked, len(token_ids)):
            if token_ids[k] in self.eos_ids:
                return self._end(token_ids, logprobs, k, "eos")
            tail = self.tokenizer.decode(token_ids[max(0, k + 1 - self.window) : k + 1])
            if any(stop in tail for stop in self.params.stop):
                return self._end(token_ids, logprobs, k, "stop")
        self.checked = len(token_ids)
        if finished:
            return self._end(token_ids, logprobs, len(token_ids) - 1, "length")
        return False

    def _end(self, token_ids, logprobs, last: int, reason: str) -> bool:
        self.token_ids = list(token_ids[: last + 1])
        self.logprobs = [float(x) for x in logprobs[: last + 1]]
        self.reason = reason
        return True

    def completion(self) -> Completion:
        return Completion(
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            text=self.tokenizer.decode(self.token_ids, skip_special_tokens=True),
            finish_reason=self.reason,
        )
