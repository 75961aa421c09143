"""TRL adapter: multi-turn TIR episodes and GTPO advantages inside TRL 1.16's real GRPOTrainer.

A tiny model is first taught a two-turn protocol (a python block, then an answer after the tool
output, mostly right; or a wrong answer straight away), so sampled episodes have one or two turns and
groups carry signal. Then ``GTPOTrainer`` trains it for 2 steps, and every advantage tensor TRL's
loss receives is compared with what our own agent's path (``TokenBatch`` + ``rollout_batch`` +
shaping + the registered ``gtpo`` estimator) computes from the same trajectories.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import require

try:
    import trl
except ImportError:  # the [trl] extra is not installed
    trl = None

pytestmark = pytest.mark.timeout(240)

CODE_TURN = "Let me compute.\n```python\nprint(1 + 1)\n```\n"
GROUP = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require(trl is not None, "TRL is not installed (pip install -e .[trl])")
    from algos.rollout import RolloutConfig, make_vec_env
    from algos.tiny import teach, tiny_model, tiny_tokenizer

    tmp = tmp_path_factory.mktemp("trl")
    problems = tmp / "one_plus_one.jsonl"
    problems.write_text("".join(
        json.dumps({"id": f"p{i}", "question": "Compute 1+1.", "answer": "2"}) + "\n"
        for i in range(4)))
    tokenizer = tiny_tokenizer()
    model = tiny_model(seed=1, tokenizer=tokenizer, num_hidden_layers=2)
    rollout = RolloutConfig(max_new_tokens=24, max_turns=2, max_total_tokens=512)
    env_kwargs = {"problems": str(problems), "system_prompt": None}  # short prompts: fast steps
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 1, tokenizer, rollout, env_kwargs)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    try:  # every problem has the same question, so one prompt covers them all
        prompt = ids(vec_env.reset(options={"problem_id": "file/p0"})[0][0])
        output = vec_env.step((CODE_TURN,))[0][0]
    finally:
        vec_env.close()
        sandbox.close()
    after = prompt + ids(CODE_TURN) + ids(output)
    # Turn 1: the tool (then mostly right) or a direct wrong answer, so groups carry signal.
    pairs = [(prompt, ids(CODE_TURN)), (prompt, ids("\\boxed{3}<|im_end|>")),
             (after, ids("\\boxed{2}<|im_end|>")), (after, ids("\\boxed{2}<|im_end|>")),
             (after, ids("\\boxed{3}<|im_end|>"))]
    teach(model, pairs, max_steps=60)
    return model, tokenizer, env_kwargs, rollout, tmp


def grpo_args(tmp, **overrides):
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=str(tmp / "out"), report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, activation_checkpointing=False, disable_tqdm=True, logging_steps=1,
        max_steps=2, learning_rate=1e-4, per_device_train_batch_size=2 * GROUP,
        num_generations=GROUP, max_completion_length=128, temperature=1.0, top_p=1.0,
        beta=0.0, loss_type="dapo", seed=0, shuffle_dataset=False, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def test_gtpo_trainer_trains_on_our_advantages(setup, monkeypatch):
    import algos.integrations.trl as adapter
    from algos.advantages import get_advantage
    from algos.batch import TokenBatch, rollout_batch
    from algos.config import GTPOConfig
    from algos.shaping import shape_rewards

    model, tokenizer, env_kwargs, rollout, tmp = setup
    recorded = {"trajectories": [], "advantages": [], "tool_mask": [], "completion_ids": []}
    real_collect = adapter.collect

    def recording_collect(*args, **kwargs):
        trajectories = real_collect(*args, **kwargs)
        recorded["trajectories"].append(trajectories)
        return trajectories

    monkeypatch.setattr(adapter, "collect", recording_collect)

    class Recording(adapter.GTPOTrainer):
        def _compute_loss(self, model, inputs):
            recorded["advantages"].append(inputs["advantages"].clone())
            recorded["tool_mask"].append(inputs["tool_mask"].clone())
            recorded["completion_ids"].append(inputs["completion_ids"].clone())
            return super()._compute_loss(model, inputs)

    gtpo = GTPOConfig()  # the defaults: turn rewards, gamma 0.9, per-turn-position scope, shaping
    before = [p.detach().clone() for p in model.parameters()]
    dataset = adapter.problem_dataset("TIR-Math-v0", n=4, **env_kwargs)
    assert dataset["prompt"] == [f"file/p{i}" for i in range(4)]
    with adapter.TIRRollout("TIR-Math-v0", tokenizer, rollout, seed=0,
                            env_kwargs=env_kwargs) as rollout_func:
        trainer = Recording(model=model, processing_class=tokenizer,
                            reward_funcs=adapter.tir_reward, args=grpo_args(tmp),
                            train_dataset=dataset, rollout_func=rollout_func, gtpo=gtpo)
        trainer.train()

    assert trainer.state.global_step == 2
    assert any((a != b).any() for a, b in zip(before, model.parameters())), "no update"
    assert len(recorded["advantages"]) == len(recorded["trajectories"]) == 2
    turns = [len(t.turns) for step in recorded["trajectories"] for t in step]
    assert 2 in turns, f"no two-turn episode was sampled: {turns}"

    for trajectories, seen, tool_mask, completion in zip(
            recorded["trajectories"], recorded["advantages"], recorded["tool_mask"],
            recorded["completion_ids"]):
        # Our agent's own path, on the same trajectories grouped as TRL groups them.
        for i, t in enumerate(trajectories):
            t.group_id = i // GROUP
        tokens, spans = TokenBatch.build(trajectories, tokenizer.pad_token_id)
        batch = rollout_batch(trajectories, spans, tokens.input_ids.shape[1])
        batch = shape_rewards(batch, [t.code for t in trajectories], alpha=gtpo.shaping_alpha,
                              similarity=gtpo.similarity)
        expected = get_advantage("gtpo")(batch, gtpo, None).tokens
        # TRL shuffles rows between scoring and the loss: match them by their token ids.
        assert seen.shape[0] == len(trajectories)
        unmatched = list(range(len(trajectories)))
        for row in range(seen.shape[0]):
            ids = completion[row].tolist()
            for i in unmatched:
                t = trajectories[i]
                start, n = len(t.prompt_ids), len(t.token_ids) - len(t.prompt_ids)
                if ids[:n] == t.token_ids[start:] and torch.allclose(
                        seen[row, :n], expected[i, start:start + n]):
                    break
            else:
                raise AssertionError(f"loss row {row}: no trajectory has its ids and advantages")
            unmatched.remove(i)
            assert not seen[row, n:].any()
            # Tool-output tokens are masked out of TRL's loss; generated tokens are not.
            generated = torch.zeros(n, dtype=torch.long)
            for a, b in spans[i]:
                generated[a - start : b - start] = 1
            assert tool_mask[row, :n].tolist() == generated.tolist()
    assert any(a.abs().sum() > 0 for a in recorded["advantages"]), "no step carried signal"


def test_rollout_func_with_plain_grpo_trainer(setup):
    """The rollout_func alone turns TRL's own GRPOTrainer into multi-turn GRPO on our env."""
    from trl import GRPOTrainer

    import algos.integrations.trl as adapter

    model, tokenizer, env_kwargs, rollout, tmp = setup
    with adapter.TIRRollout("TIR-Math-v0", tokenizer, rollout, seed=1,
                            env_kwargs=env_kwargs) as rollout_func:
        trainer = GRPOTrainer(model=model, processing_class=tokenizer,
                              reward_funcs=adapter.tir_reward, args=grpo_args(tmp, max_steps=1),
                              train_dataset=adapter.problem_dataset(
                                  "TIR-Math-v0", n=4, **env_kwargs),
                              rollout_func=rollout_func)
        trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(TypeError, match="problem id"):
        adapter.TIRRollout("TIR-Math-v0", tokenizer, rollout)([{"role": "user"}], trainer)
    with pytest.raises(ValueError, match="rollout_func"):
        adapter.GTPOTrainer(model=model, processing_class=tokenizer,
                            reward_funcs=adapter.tir_reward, args=grpo_args(tmp))
