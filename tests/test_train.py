"""End-to-end training through the real env and local sandbox, on tiny models made here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import algos
import tir_envs  # noqa: F401  (registers the env ids)
from algos.agent import token_logprobs
from algos.config import GRPOConfig, GTPOConfig, PPOConfig
from algos.generation.base import GenerationError
from algos.generation.hf import HFGenerator
from algos.losses import policy_loss
from algos.rollout import RolloutConfig, collect, make_vec_env
from algos.tiny import teach, tiny_model, tiny_tokenizer

SMALL = dict(prompts_per_iteration=2, group_size=2, minibatch_size=2, grad_accum_steps=2, lr=1e-3)
ROLLOUT = RolloutConfig(max_new_tokens=24, max_turns=2, max_total_tokens=768)
CONFIGS = {"gtpo": GTPOConfig, "grpo": GRPOConfig, "ppo": PPOConfig}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def length_reward(outcome):
    """A reward that differs between an untrained model's samples, so every group has signal."""
    return {"accuracy": 0.0, "format": 0.0, "length": 0.1 * (len(outcome.action) % 5)}


def make_agent(algo, tokenizer, run_dir=None, env="TIR-Math-v0", seed=0, env_kwargs=None,
               **overrides):
    config = CONFIGS[algo](**{**SMALL, "seed": seed, **overrides})
    model = tiny_model(seed=seed, tokenizer=tokenizer)
    return algos.make(algo, model, env, config, tokenizer=tokenizer, rollout=ROLLOUT,
                      run_dir=run_dir, env_kwargs=env_kwargs)


@pytest.mark.parametrize("algo, extra", [
    ("gtpo", {}), ("grpo", {}), ("ppo", {}),
    ("grpo", {"kl_coef": 0.04, "entropy_coef": 0.01, "loss_aggregation": "seq_mean"}),
])
def test_one_iteration_end_to_end(algo, extra, tokenizer, tmp_path):
    with make_agent(algo, tokenizer, run_dir=tmp_path,
                    env_kwargs={"reward_fn": length_reward}, **extra) as agent:
        assert (agent.reference is not None) == bool(extra.get("kl_coef"))
        before = {k: v.clone() for k, v in agent.trainable.state_dict().items()}
        agent.learn(1, progress=False)
        after = agent.trainable.state_dict()
    assert agent.iteration == 1
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward/mean", "accuracy", "turns/mean", "tool_call_rate", "exec_error_rate",
                "loss/entropy", "loss/clip_frac", "time/rollout_s", "tokens/update_per_s"):
        assert key in row, key
    if algo == "ppo":
        assert "loss/vf_loss" in row
    if extra.get("kl_coef"):
        assert "loss/kl" in row
    checkpoint = tmp_path / "checkpoints" / "iter_000001"
    assert (checkpoint / "trainer.pt").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint / "model")  # an HF model directory


def test_rollout_ids_match_full_tokenization(tokenizer):
    """Token in, token out: generated ids are kept as sampled and only tool output is tokenized.

    Re-tokenizing the decoded conversation may merge characters differently at the seams between
    generated text and tool output (BPE is not compositional), and the model may have sampled
    a non-canonical split of a word. Neither is allowed to change training data, so the assembled
    ids are compared seam by seam: each piece tokenized alone equals the kept ids of the env's pieces,
    and decoding the whole sequence gives exactly the conversation text.
    """
    rollout = RolloutConfig(max_new_tokens=16, max_turns=3, max_total_tokens=768)
    model = tiny_model(seed=1, tokenizer=tokenizer)
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 4, tokenizer, rollout)
    try:
        generator = HFGenerator(model, tokenizer)
        params = generator_params(rollout, seed=3)
        trajectories = collect(vec_env, generator, tokenizer, ["proc/modpow/1", "proc/nth_prime/2"],
                               2, params, max_total_tokens=rollout.max_total_tokens)
    finally:
        vec_env.close()
        sandbox.close()
    for trajectory in trajectories:
        text = tokenizer.decode(trajectory.prompt_ids)
        for turn in trajectory.turns:
            text += tokenizer.decode(turn.generated_ids) + tokenizer.decode(turn.env_ids)
            if turn.env_ids:
                assert tokenizer.decode(turn.env_ids) == tokenizer.decode(
                    tokenizer(tokenizer.decode(turn.env_ids), add_special_tokens=False)["input_ids"]
                )
        assert tokenizer.decode(trajectory.token_ids) == text
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        # Same text; ids may differ only where sampling chose a non-canonical split.
        assert tokenizer.decode(full) == text


class FailsOnSecondCall(HFGenerator):
    """The real local backend, except that its second call fails as a dead server would."""

    calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == 2:
            raise GenerationError("connection refused")
        return super().generate(prompts, params)


def test_a_failed_backend_call_excludes_its_episodes_as_infra_errors(tokenizer, tmp_path):
    """Episodes still running when the backend fails end as infra errors, which the iteration
    leaves out of its statistics and loss instead of crashing or scoring them.

    The model is taught to open with a code block, so episodes reach a second turn, and the
    backend fails there; the first-turn trajectories that answered stay scored."""
    problems = ["proc/modpow/1", "proc/nth_prime/2"]
    model = tiny_model(seed=4, tokenizer=tokenizer)
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 1, tokenizer, ROLLOUT)
    try:
        prompts = [tokenizer(vec_env.reset(options={"problem_id": p})[0][0],
                             add_special_tokens=False)["input_ids"] for p in problems]
    finally:
        vec_env.close()
        sandbox.close()
    code = tokenizer("```python\nprint(2)\n```\n", add_special_tokens=False)["input_ids"]
    teach(model, [(p, code) for p in prompts], max_steps=60)
    config = GTPOConfig(**{**SMALL, "seed": 0})
    with algos.make("gtpo", model, "TIR-Math-v0", config, tokenizer=tokenizer, rollout=ROLLOUT,
                    run_dir=tmp_path, env_kwargs={"reward_fn": length_reward}) as agent:
        agent.generator = FailsOnSecondCall(agent.policy, tokenizer)
        trajectories = collect(agent.vec_env(), agent.generator, tokenizer, problems, 2,
                               generator_params(ROLLOUT, seed=0), ROLLOUT.max_total_tokens)
        failed = [t for t in trajectories if t.infra_error]
        assert failed, [t.turns[0].info.get("tool_called") for t in trajectories]
        assert all(t.done_reason == "infra_error" and len(t.turns) == 1 for t in failed)
        agent.generator = FailsOnSecondCall(agent.policy, tokenizer)
        metrics = agent.train_iteration()
    assert 0 < metrics["infra_error_rate"] <= 1
    assert agent.iteration == 1


def generator_params(rollout, seed):
    from algos.generation.base import SamplingParams

    return SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=1.0,
                          stop=rollout.stop, seed=seed)


def test_prompt_and_tool_tokens_get_zero_gradient(tokenizer):
    """Only generated tokens carry gradient: logits at positions that predict prompt or tool-output
    tokens get exactly 0."""
    torch.manual_seed(0)
    model = tiny_model(seed=2, tokenizer=tokenizer)
    ids = torch.randint(10, 500, (2, 12))
    # positions 4-6 generated (turn 1), 7-8 tool output, 9-10 generated (turn 2), 11 padding
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 4:7] = True
    mask[:, 9:11] = True
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = out.logits.detach().requires_grad_(True)
    logprobs, _ = token_logprobs(logits, ids, mask, temperature=1.0)
    loss = policy_loss(logprobs, logprobs.detach() - 0.1, torch.randn(2, 12), mask).loss
    loss.backward()
    grad = logits.grad.abs().sum(-1)  # [B, L]: gradient reaching the logits at each position
    predicts = torch.zeros_like(mask)
    predicts[:, :-1] = mask[:, 1:]  # logits at t predict token t+1
    assert torch.all(grad[~predicts] == 0)
    assert torch.all(grad[predicts] > 0)


@pytest.mark.timeout(900)  # a hang guard: its 10 iterations took 252 s at load 3.2
def test_learning_raises_reward(tokenizer, tmp_path):
    """A tiny policy that answers right half the time learns to answer right.

    Every problem asks for 1+1; the model is first taught two replies equally often, a right
    ``\\boxed{2}`` and a wrong ``\\boxed{3}``. GRPO-style credit should move it to the right one.
    """
    problems = tmp_path / "one_plus_one.jsonl"
    problems.write_text("".join(
        json.dumps({"id": f"p{i}", "question": f"Compute 1+1 (copy {i}).", "answer": "2"}) + "\n"
        for i in range(16)
    ))
    model = tiny_model(seed=3, tokenizer=tokenizer)
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 1, tokenizer, ROLLOUT, {"problems": str(problems)})
    try:
        prompts = [tokenizer(vec_env.reset(options={"problem_id": f"file/p{i}"})[0][0],
                             add_special_tokens=False)["input_ids"] for i in range(4)]
    finally:
        vec_env.close()
        sandbox.close()
    replies = [tokenizer("\\boxed{2}<|im_end|>", add_special_tokens=False)["input_ids"],
               tokenizer("\\boxed{3}<|im_end|>", add_special_tokens=False)["input_ids"]]
    teach(model, [(p, r) for p in prompts for r in replies], max_steps=80)

    config = GTPOConfig(prompts_per_iteration=4, group_size=4, minibatch_size=16,
                        grad_accum_steps=2, lr=1e-3, seed=0)
    rollout = RolloutConfig(max_new_tokens=12, max_turns=1, max_total_tokens=768)
    with algos.make("gtpo", model, "TIR-Math-v0", config, tokenizer=tokenizer, rollout=rollout,
                    env_kwargs={"problems": str(problems)}) as agent:
        start = agent.evaluate([f"file/p{i}" for i in range(16)], samples=2, temperature=1.0)
        agent.learn(10, progress=False)
        end = agent.evaluate([f"file/p{i}" for i in range(16)], samples=2, temperature=1.0)
    assert 0.2 <= start["pass@1"] <= 0.8, start
    assert end["pass@1"] >= max(0.9, start["pass@1"] + 0.25), (start, end)


def test_bad_inputs_fail_before_any_work(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="minibatch_size"):
        GTPOConfig(prompts_per_iteration=2, group_size=2, minibatch_size=8)
    with pytest.raises(FileNotFoundError):
        algos.make("gtpo", str(tmp_path / "no-such-model"), "TIR-Math-v0",
                   GTPOConfig(**SMALL))
    with pytest.raises(ValueError, match="not a TIR env"):
        make_agent("grpo", tokenizer, env="CartPole-v1")
    with pytest.raises(ValueError, match="unknown algorithm"):
        algos.make("dqn", "x")
    with pytest.raises(TypeError, match="GTPOConfig"):
        algos.make("gtpo", tiny_model(tokenizer=tokenizer), "TIR-Math-v0", GRPOConfig(**SMALL),
                   tokenizer=tokenizer)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch, algos
    from algos.config import GTPOConfig
    from algos.rollout import RolloutConfig
    from algos.tiny import tiny_model, tiny_tokenizer

    run_dir, iterations = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    config = GTPOConfig(prompts_per_iteration=2, group_size=2, minibatch_size=2,
                        grad_accum_steps=1, lr=1e-3, seed=7)
    rollout = RolloutConfig(max_new_tokens=16, max_turns=2, max_total_tokens=768)
    with algos.make("gtpo", tiny_model(seed=7, tokenizer=tok), "TIR-Math-v0", config,
                    tokenizer=tok, rollout=rollout, run_dir=run_dir) as agent:
        agent.resume()
        agent.learn(iterations, progress=False)
""")


def run_training(run_dir, iterations):
    return subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(run_dir), str(iterations)],
                            cwd=Path(__file__).resolve().parents[1])


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """kill -9 in the middle of a run, resume: the same weights and log as a run never killed."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_training(straight, 4).wait(timeout=600) == 0
    victim = run_training(resumed, 4)
    log = resumed / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)  # during iteration 3 (or while checkpoint 2 is written)
    victim.wait(timeout=30)
    assert not (resumed / "checkpoints" / "iter_000004").exists()
    assert run_training(resumed, 4).wait(timeout=600) == 0

    from safetensors.torch import load_file

    a = load_file(straight / "checkpoints" / "iter_000004" / "model" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "iter_000004" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    iterations = [json.loads(x)["iteration"] for x in log.read_text().splitlines()]
    assert iterations == [1, 2, 3, 4]
    rewards = [json.loads(x)["reward/mean"] for x in log.read_text().splitlines()]
    assert rewards == [json.loads(x)["reward/mean"]
                       for x in (straight / "metrics.jsonl").read_text().splitlines()]
