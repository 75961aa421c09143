"""The generation layer on tiny models: exact ids, logprobs that the trainer can reproduce,
stop strings that end a turn at the closing code fence, and batching that changes nothing."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from algos.generation import Completion, GenerationError, SamplingParams, make_generator
from algos.tiny import teach, tiny_config, tiny_model, tiny_tokenizer

TURN = "I will compute it.\n```python\nprint(2 + 3)\n```\nDone."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(0, tok)


def chat(tok, question: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )["input_ids"]


@pytest.fixture(scope="module")
def prompts(tok):
    questions = ["What is 2+3?", "Compute the sum of 1, 2, 3 and 4.", "x", "Find n such that n*n = 49"]
    return [chat(tok, q) for q in questions]


@pytest.fixture(scope="module")
def taught(tok):
    """A tiny model that answers these prompts with TURN: a python block, then more text."""
    questions = ["What is 2+3?", "Add two and three, what do you get?"]
    ps = [chat(tok, q) for q in questions]
    completion = tok(TURN, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return teach(tiny_model(1, tok), [(p, completion) for p in ps]), ps


def recomputed_logprobs(model, prompt: list[int], ids: list[int], temperature: float) -> torch.Tensor:
    """What the trainer computes: one forward pass over prompt + generated ids."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(1, torch.tensor(ids)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_logprobs_match_a_fresh_forward_pass(model, tok, prompts, temperature, top_p):
    gen = make_generator("hf", model=model, tokenizer=tok)
    params = SamplingParams(max_new_tokens=24, temperature=temperature, top_p=top_p, seed=3)
    for prompt, c in zip(prompts, gen.generate(prompts, params)):
        assert isinstance(c, Completion) and len(c.token_ids) == len(c.logprobs) > 0
        expected = recomputed_logprobs(model, prompt, c.token_ids, temperature or 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_batched_greedy_equals_one_by_one(model, tok, prompts):
    gen = make_generator("hf", model=model, tokenizer=tok)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    batched = gen.generate(prompts, params)
    chunked = make_generator("hf", model=model, tokenizer=tok, max_batch_size=3).generate(prompts, params)
    for prompt, b, c in zip(prompts, batched, chunked):
        [single] = gen.generate([prompt], params)
        assert b.token_ids == single.token_ids == c.token_ids
        torch.testing.assert_close(b.logprobs, single.logprobs, atol=1e-4, rtol=1e-4)


def test_seed_reproduces_without_touching_global_rng(model, tok, prompts):
    gen = make_generator("hf", model=model, tokenizer=tok)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    state = torch.random.get_rng_state()
    first = gen.generate(prompts, params)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [c.token_ids for c in gen.generate(prompts, params)] == [c.token_ids for c in first]
    other = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_stop_string_ends_turn_at_closing_fence(taught, tok):
    model, ps = taught
    gen = make_generator("hf", model=model, tokenizer=tok)
    full = gen.generate(ps, SamplingParams(max_new_tokens=60, temperature=0))
    for c in full:  # without a stop string the model writes on to its eos, which is kept
        assert c.text == TURN and c.finish_reason == "eos" and c.token_ids[-1] == tok.eos_token_id
    stopped = gen.generate(ps, SamplingParams(max_new_tokens=60, temperature=0, stop=("```\n",)))
    for c, f in zip(stopped, full):
        assert c.finish_reason == "stop"
        assert c.text == "I will compute it.\n```python\nprint(2 + 3)\n```\n"  # not the opening fence
        assert c.token_ids == f.token_ids[: len(c.token_ids)]  # a prefix of what it would sample
        assert c.logprobs == pytest.approx(f.logprobs[: len(c.logprobs)], abs=1e-5)


def test_sequences_stop_independently(taught, tok):
    model, ps = taught
    gen = make_generator("hf", model=model, tokenizer=tok)
    other = chat(tok, "Find n such that n*n = 49")  # untaught: runs to max_new_tokens
    out = gen.generate([ps[0], other], SamplingParams(max_new_tokens=30, temperature=0, stop=("```\n",)))
    assert out[0].finish_reason == "stop" and out[0].text.endswith("```\n")
    assert out[1].finish_reason == "length" and len(out[1].token_ids) == 30


def test_finished_rows_leave_the_batch(taught, tok):
    model, ps = taught
    gen = make_generator("hf", model=model, tokenizer=tok)
    other = chat(tok, "Find n such that n*n = 49")  # untaught: runs to max_new_tokens
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = gen.generate([ps[0], other, ps[1]],
                           SamplingParams(max_new_tokens=30, temperature=0, stop=("```\n",)))
    finally:
        hook.remove()
    turn = len(out[0].token_ids)
    assert [c.finish_reason for c in out] == ["stop", "length", "stop"]
    assert len(out[2].token_ids) == turn < 30
    # the prefill and the steps until the fence at batch 3, then only the untaught row
    assert rows == [3] * turn + [1] * (30 - turn)


def sliding_window_model(tok):
    """A tiny Mistral with a sliding window: its cache layers are not plain ``DynamicLayer``s,
    so nothing is kept between calls and finished rows stay in the batch, fed padding."""
    from transformers import MistralConfig, MistralForCausalLM

    llama = tiny_config(tok).to_dict()
    fields = MistralConfig().to_dict()
    config = MistralConfig(**{k: v for k, v in llama.items()
                              if k in fields and k not in ("model_type", "architectures")},
                           sliding_window=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama", "sliding-window"])
def test_rows_that_stop_early_change_no_other_row(tok, prompts, arch):
    """Rows end at different steps (taught turns of different lengths), and every row is what
    it would be alone: with finished rows dropped (llama) or fed padding
    (sliding window)."""
    model = tiny_model(6, tok) if arch == "llama" else sliding_window_model(tok)
    turns = [f"{'step ' * k}```python\nprint({k})\n```\n" for k in (0, 2, 5)]
    model = teach(model, [(p, tok(t, add_special_tokens=False)["input_ids"])
                          for p, t in zip(prompts, turns)])
    gen = make_generator("hf", model=model, tokenizer=tok)
    assert (gen.prefix is None) == (arch == "sliding-window")
    params = SamplingParams(max_new_tokens=40, temperature=0, stop=("```\n",))
    batched = gen.generate(prompts, params)
    assert [c.text for c in batched[:3]] == turns
    assert [c.finish_reason for c in batched[:3]] == ["stop"] * 3
    for prompt, b in zip(prompts, batched):
        [single] = gen.generate([prompt], params)
        assert b.token_ids == single.token_ids and b.finish_reason == single.finish_reason
        torch.testing.assert_close(torch.tensor(b.logprobs),
                                   recomputed_logprobs(model, prompt, b.token_ids, 1.0),
                                   atol=1e-4, rtol=1e-4)


def test_length_and_empty_batch(model, tok, prompts):
    gen = make_generator("hf", model=model, tokenizer=tok)
    assert gen.generate([], SamplingParams()) == []
    out = gen.generate(prompts[:1], SamplingParams(max_new_tokens=5, temperature=0))
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 5


def test_generation_leaves_training_mode_and_model_config(model, tok, prompts):
    gen = make_generator("hf", model=model, tokenizer=tok)
    before = model.generation_config.to_dict()
    model.train()
    try:
        gen.generate(prompts[:1], SamplingParams(max_new_tokens=3, temperature=0.5, top_p=0.5))
        assert model.training
    finally:
        model.eval()
    assert model.generation_config.to_dict() == before


def fed_widths(model) -> list[int]:
    """Records how many columns each forward pass of ``model`` is fed (prefill, then 1 a step)."""
    widths: list[int] = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append((kwargs.get("input_ids") if "input_ids" in kwargs
                                               else args[0]).shape[1]), with_kwargs=True)
    return widths


def multi_turn(gen, tok, prompts, params, turns=3) -> list[list]:
    """Every row's completions over ``turns`` turns, each next prompt being the last prompt, the
    completion and a tool output of a length that differs by row."""
    contexts, out = [list(p) for p in prompts], []
    for _ in range(turns):
        completions = gen.generate(contexts, params)
        out.append(completions)
        for row, c in enumerate(completions):
            tool = tok(f"output {row}\n" * (row % 3 + 1), add_special_tokens=False)["input_ids"]
            contexts[row] += c.token_ids + tool
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kept_states_change_no_token_and_no_logprob(tok, prompts, temperature):
    model = tiny_model(2, tok)
    group = [p for p in prompts for _ in range(3)]  # a group's samples share their prompt
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=11)
    fresh = multi_turn(make_generator("hf", model=model, tokenizer=tok, prefix_cache_bytes=0),
                       tok, group, params)
    gen = make_generator("hf", model=model, tokenizer=tok)
    widths = fed_widths(model)
    kept = multi_turn(gen, tok, group, params)
    for turn_kept, turn_fresh in zip(kept, fresh):
        for k, f in zip(turn_kept, turn_fresh):
            assert k.token_ids == f.token_ids and k.finish_reason == f.finish_reason
            torch.testing.assert_close(torch.tensor(k.logprobs), torch.tensor(f.logprobs),
                                       atol=1e-5, rtol=1e-5)
    longest = max(map(len, prompts))
    prefills = [w for w in widths if w > 1]
    # turn 1: the 4 distinct prompts once (all but their last token), then only the last column
    # of the batch; turns 2 and 3 prefill the new tail, never the whole context
    assert prefills[0] == longest - 1 and widths[1] == 1
    assert all(w < longest for w in prefills[1:])
    assert len(gen.prefix.entries) <= len(group) and gen.prefix.bytes <= gen.prefix.max_bytes


def test_kept_and_new_prompts_in_one_batch(tok, prompts):
    """A long context with kept states next to a short prompt with none (whose padding covers
    the kept columns) and a long one with none (which leaves nothing to reuse)."""
    model = tiny_model(4, tok)
    gen = make_generator("hf", model=model, tokenizer=tok)
    fresh = make_generator("hf", model=model, tokenizer=tok, prefix_cache_bytes=0)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    [first] = gen.generate([prompts[1]], params)
    tool = tok("output line\n" * 8, add_special_tokens=False)["input_ids"]
    assert len(tool) > len(prompts[2])  # the kept columns end inside the short prompt's padding
    context = prompts[1] + first.token_ids + tool
    widths = fed_widths(model)
    for batch, reused in (([context, prompts[2]], True), ([context, prompts[2], context[::-1]], False)):
        widths.clear()
        got = gen.generate(batch, params)
        assert (widths[0] < len(context)) == reused
        expected = fresh.generate(batch, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        for g, e in zip(got, expected):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs),
                                       atol=1e-5, rtol=1e-5)
        gen.prefix.clear()
        gen.generate([prompts[1]], params)


def test_kept_states_are_dropped_when_the_weights_change(tok, prompts):
    model = tiny_model(3, tok)
    gen = make_generator("hf", model=model, tokenizer=tok)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    first = gen.generate(prompts, params)
    assert gen.prefix.entries
    with torch.no_grad():  # an in-place update, as an optimizer step or load_state_dict does
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    contexts = [p + c.token_ids for p, c in zip(prompts, first)]
    assert gen.prefix.entries  # the version check empties them when generation next starts
    after = gen.generate(contexts, params)
    expected = make_generator("hf", model=model, tokenizer=tok, prefix_cache_bytes=0).generate(
        contexts, params)
    assert [c.token_ids for c in after] == [c.token_ids for c in expected]
    for prompt, c in zip(contexts, after):
        torch.testing.assert_close(torch.tensor(c.logprobs),
                                   recomputed_logprobs(model, prompt, c.token_ids, 1.0),
                                   atol=1e-4, rtol=1e-4)


def test_update_weights_drops_kept_states(model, tok, prompts):
    """Weights swapped without touching tensor versions (``param.data = ...``) are caught by the
    trainer's ``update_weights`` call."""
    gen = make_generator("hf", model=model, tokenizer=tok)
    gen.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0))
    assert gen.prefix.entries
    gen.update_weights(model)
    assert not gen.prefix.entries and gen.prefix.bytes == 0


def test_kept_states_stay_within_their_budget(model, tok, prompts):
    one_entry = make_generator("hf", model=model, tokenizer=tok)
    one_entry.generate(prompts[:1], SamplingParams(max_new_tokens=4, temperature=0))
    budget = one_entry.prefix.bytes * 2  # room for about two of these sequences
    gen = make_generator("hf", model=model, tokenizer=tok, prefix_cache_bytes=budget)
    gen.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0))
    assert 0 < gen.prefix.bytes <= budget and len(gen.prefix.entries) < len(prompts)
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        make_generator("hf", model=model, tokenizer=tok, prefix_cache_bytes=-1)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"stop": ("",)}],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_prompts_and_backend(model, tok):
    gen = make_generator("hf", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="prompt 1"):
        gen.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_generator("nope")
    assert SamplingParams(stop="```\n").stop == ("```\n",)


def test_vllm_backend_says_how_to_install_it():
    pytest.importorskip("algos.generation.vllm")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install '\.\[vllm\]'"):
            make_generator("vllm", model="unused")
    else:
        pytest.skip("vllm is installed; its backend needs a GPU test")


class _FakeOpenAI(BaseHTTPRequestHandler):
    """A loopback completions server answering like vLLM with return_tokens_as_token_ids; a
    prompt ending in 0 gets HTTP 503, one ending in 1 a closed connection."""

    requests: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if not self.path.endswith("/completions"):  # no weight-reload routes (no dev mode)
            self.send_error(404, "Not Found")
            return
        last = body["prompt"][-1]
        if last == 1:
            self.close_connection = True
            return
        if last == 0:
            self.send_error(503, "engine dead")
            return
        kind = {5: "stop", 11: "eos"}.get(last, "length")
        choice = {
            "index": 0,
            "text": f"t{last}```\n" if kind == "stop" else f"t{last}",
            "finish_reason": "length" if kind == "length" else "stop",
            "stop_reason": "```\n" if kind == "stop" else None,
            "logprobs": {
                "tokens": [f"token_id:{last + 1}", f"token_id:{last + 2}"],
                "token_logprobs": [-0.5, -0.25],
            },
        }
        payload = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeOpenAI.requests.clear()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_against_a_loopback_server(fake_openai):
    """One request per prompt, each with its own seed (seed + index), answers kept in order."""
    gen = make_generator("openai", base_url=fake_openai, model="m", timeout=10)
    params = SamplingParams(max_new_tokens=2, temperature=0.5, stop=("```\n",), seed=1)
    out = gen.generate([[5], [10, 11], [20]], params)
    assert [c.token_ids for c in out] == [[6, 7], [12, 13], [21, 22]]
    assert [c.finish_reason for c in out] == ["stop", "eos", "length"]
    assert out[0].logprobs == [-0.5, -0.25] and out[1].text == "t11"
    sent = sorted(_FakeOpenAI.requests, key=lambda body: body["seed"])
    assert [(b["prompt"], b["seed"]) for b in sent] == [([5], 1), ([10, 11], 2), ([20], 3)]
    assert all(b["stop"] == ["```\n"] and b["max_tokens"] == 2 for b in sent)
    assert not math.isnan(out[2].logprobs[0])


@pytest.mark.parametrize("prompt, message", [([3, 0], "HTTP 503"), ([3, 1], "failed")])
def test_openai_backend_reports_a_failing_server_as_a_generation_error(
    fake_openai, prompt, message
):
    """A 5xx answer or a dropped connection is the server's failure (episodes become infra
    errors); a refused connection too."""
    gen = make_generator("openai", base_url=fake_openai, model="m", timeout=10)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(GenerationError, match=message):
        gen.generate([[5], prompt], params)
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        closed = make_generator("openai", base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                                model="m", timeout=10)
        with pytest.raises(GenerationError, match="refused"):
            closed.generate([[5]], params)


def test_openai_backend_needs_a_weights_dir_to_follow_training(fake_openai, model, tmp_path):
    """Without a weights dir it refuses; with one it saves the policy (its tied head as a
    tensor of its own, which vLLM reloads) and says what a server without reload routes lacks."""
    from safetensors import safe_open

    gen = make_generator("openai", base_url=fake_openai, model="m")
    with pytest.raises(RuntimeError, match="weights_dir"):
        gen.update_weights(model)
    gen = make_generator("openai", base_url=fake_openai, model="m", weights_dir=tmp_path / "w")
    with pytest.raises(RuntimeError, match="VLLM_SERVER_DEV_MODE=1"):
        gen.update_weights(model)
    assert model.config.tie_word_embeddings
    assert json.loads((tmp_path / "w" / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(tmp_path / "w" / "model.safetensors", "pt") as saved:
        assert torch.equal(saved.get_tensor("lm_head.weight"), model.lm_head.weight)
        assert torch.equal(saved.get_tensor("model.embed_tokens.weight"), model.lm_head.weight)
