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
from algos.tiny import teach, tiny_model, tiny_tokenizer

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
