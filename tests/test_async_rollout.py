"""Asynchronous rollouts: episodes advance on their own through an env pool, and the
continuous-batching backend batches every live episode's turn, on tiny models taught here."""

from __future__ import annotations

import threading

import pytest
import torch

import tir_envs  # noqa: F401  (registers the env ids)
from algos.envpool import ThreadEnvPool, env_pool
from algos.generation.base import GenerationError, SamplingParams
from algos.generation.hf import HFGenerator
from algos.generation.hf_continuous import ContinuousHFGenerator
from algos.rollout import (
    EpisodeScheduler,
    RolloutConfig,
    collect,
    collect_lockstep,
    make_vec_env,
    start_episodes,
)
from algos.tiny import teach, tiny_model, tiny_tokenizer

ROLLOUT = RolloutConfig(max_new_tokens=24, max_turns=2, max_total_tokens=768)
PROBLEMS = ["proc/modpow/1", "proc/nth_prime/2"]
CODE = "```python\nprint(2)\n```\n"
LOGPROB_TOLERANCE = 1e-4
"""Paged attention and the plain forward pass sum in different orders; fp32 keeps them this close."""


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def params(seed=0, temperature=1.0, max_new_tokens=ROLLOUT.max_new_tokens):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                          stop=ROLLOUT.stop, seed=seed)


def env_prompts(tokenizer, problems):
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 1, tokenizer, ROLLOUT)
    try:
        return [tokenizer(vec_env.reset(options={"problem_id": p})[0][0],
                          add_special_tokens=False)["input_ids"] for p in problems]
    finally:
        vec_env.close()
        sandbox.close()


def taught_model(tokenizer, completions: dict[str, str], seed=4, steps=150):
    """A tiny model that continues each problem's prompt with the given text."""
    prompts = env_prompts(tokenizer, list(completions))
    model = tiny_model(seed=seed, tokenizer=tokenizer)
    pairs = [(p, tokenizer(text, add_special_tokens=False)["input_ids"])
             for p, text in zip(prompts, completions.values())]
    return teach(model, pairs, max_steps=steps), prompts


def comparable(trajectory):
    """Everything a trajectory records except how long its code took to run."""
    turns = []
    for turn in trajectory.turns:
        info = {k: v for k, v in turn.info.items() if k != "exec"}
        # a vector env's infos put every sub-env's "correct" into one array typed by the first
        # value it sees, so lockstep reads an ungraded turn's None as False when a sibling's is bool
        info["correct"] = bool(info.get("correct"))
        exec_ = {k: v for k, v in turn.info.get("exec", {}).items() if k != "duration_s"}
        turns.append((turn.generated_ids, turn.logprobs, turn.env_ids, turn.reward, info, exec_,
                      turn.finish_reason))
    return (trajectory.prompt_ids, trajectory.group_id, trajectory.problem_id,
            trajectory.done_reason, turns)


def test_continuous_backend_returns_sampled_ids_logprobs_and_stops(tokenizer):
    """Ids and logprobs are exact: the logprobs equal ``log_softmax(logits / T)`` recomputed by a
    plain forward pass over the returned ids, a request ends at the token that completes the stop
    string, and greedy decoding returns the same ids as the ``hf`` backend."""
    model, (prompt, other) = taught_model(tokenizer, {PROBLEMS[0]: CODE + "and more text",
                                                      PROBLEMS[1]: "no code here at all"})
    generator = ContinuousHFGenerator(model, tokenizer)
    try:
        sampled = generator.generate([prompt, prompt, other], params(seed=1, temperature=0.7))
        greedy = generator.generate([prompt, other], params(temperature=0.0))
    finally:
        generator.close()
    assert model.config._attn_implementation == "sdpa"  # restored when the session ends
    for p, completion in zip([prompt, prompt, other], sampled):
        ids = torch.tensor([p + completion.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1 : -1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(
            1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(completion.logprobs), expected,
                              atol=LOGPROB_TOLERANCE), (completion.logprobs, expected.tolist())
    stopped = [c for c in sampled + greedy if c.finish_reason == "stop"]
    assert stopped, [c.text for c in sampled + greedy]
    for completion in stopped:
        assert "```\n" in completion.text
        assert "```\n" not in tokenizer.decode(completion.token_ids[:-1])
    reference = HFGenerator(model, tokenizer).generate([prompt, other], params(temperature=0.0))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in reference]
    assert [c.finish_reason for c in greedy] == [c.finish_reason for c in reference]
    with pytest.raises(ValueError, match="top-p"):
        generator.generate([prompt], SamplingParams(max_new_tokens=4, top_p=0.9))


SLOW_CODE = "```python\nimport time\ntime.sleep(2)\nprint(2)\n```\n"


@pytest.mark.parametrize("first_code", [CODE, SLOW_CODE], ids=["fast-tools", "a-slow-tool"])
def test_async_collect_equals_lockstep_with_the_hf_backend(tokenizer, first_code):
    """With a backend that batches within a call, the scheduler sends each turn round as one call
    once the env steps are back, so under a fixed seed it records what lockstep records, even
    when one episode's tool call takes seconds while the others' take milliseconds."""
    model, _ = taught_model(tokenizer, {PROBLEMS[0]: first_code, PROBLEMS[1]: CODE})
    generator = HFGenerator(model, tokenizer)
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 5, tokenizer, ROLLOUT)
    try:
        with env_pool(vec_env) as pool:
            assert isinstance(pool, ThreadEnvPool)
        lockstep = collect_lockstep(vec_env, generator, tokenizer, PROBLEMS, 2, params(seed=3),
                                    ROLLOUT.max_total_tokens)
        scheduled = collect(vec_env, generator, tokenizer, PROBLEMS, 2, params(seed=3),
                            ROLLOUT.max_total_tokens)
    finally:
        vec_env.close()
        sandbox.close()
    assert len(scheduled) == 4
    assert any(len(t.turns) == 2 for t in scheduled), [len(t.turns) for t in scheduled]
    assert [comparable(t) for t in scheduled] == [comparable(t) for t in lockstep]


def test_a_later_turn_is_sent_before_every_first_turn_is_back(tokenizer):
    """Episodes of different lengths overlap: one episode's short first turn runs its code and
    its second turn goes to the generator while another episode is still writing a long first
    turn, as the scheduler's own record shows."""
    long_text = " ".join(["the answer needs a long explanation"] * 6)
    model, _ = taught_model(tokenizer, {PROBLEMS[0]: CODE, PROBLEMS[1]: long_text}, steps=300)
    generator = ContinuousHFGenerator(model, tokenizer)
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 2, tokenizer, ROLLOUT)
    try:
        with env_pool(vec_env) as pool:
            trajectories = start_episodes(pool, tokenizer, PROBLEMS, 1)
            scheduler = EpisodeScheduler(pool, generator, tokenizer,
                                         params(temperature=0.0, max_new_tokens=128), 2048)
            scheduler.run(trajectories)
    finally:
        generator.close()
        vec_env.close()
        sandbox.close()
    short, long = trajectories
    assert len(short.turns) == 2 and short.turns[0].finish_reason == "stop", short.turns
    assert len(long.turns) == 1 and len(long.turns[0].generated_ids) > 24
    events = scheduler.events
    assert events.index(("send", 0, 1)) < events.index(("generated", 1, 0)), events
    for t in trajectories:
        assert t.done_reason in ("terminated", "truncated")
        assert all(len(turn.generated_ids) == len(turn.logprobs) for turn in t.turns)
        assert t.turns[-1].env_ids == []


class FailsOnCall(ContinuousHFGenerator):
    """The real continuous-batching backend, except that one call fails as a dead engine would."""

    def __init__(self, *args, failing_call: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.failing_call = failing_call
        self.calls = 0
        self.count_lock = threading.Lock()

    def generate(self, prompts, params):
        with self.count_lock:
            self.calls += 1
            call = self.calls
        if call == self.failing_call:
            raise GenerationError("engine gone")
        return super().generate(prompts, params)


def test_a_failed_call_ends_only_its_episode_as_an_infra_error(tokenizer):
    """One call per turn: the four first turns are calls 1-4, so call 5 is one episode's second
    turn. That episode ends as an infra error after its first turn; the others finish."""
    model, _ = taught_model(tokenizer, {p: CODE for p in PROBLEMS})
    generator = FailsOnCall(model, tokenizer, failing_call=5)
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 4, tokenizer, ROLLOUT)
    try:
        trajectories = collect(vec_env, generator, tokenizer, PROBLEMS, 2,
                               params(temperature=0.0), ROLLOUT.max_total_tokens)
    finally:
        generator.close()
        vec_env.close()
        sandbox.close()
    failed = [t for t in trajectories if t.infra_error]
    assert len(failed) == 1 and failed[0].done_reason == "infra_error"
    assert len(failed[0].turns) == 1
    others = [t for t in trajectories if not t.infra_error]
    assert all(len(t.turns) == 2 and t.done_reason in ("terminated", "truncated") for t in others)
    assert generator.calls == 8
