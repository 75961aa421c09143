"""verl adapter, checked inside verl 0.9.1 itself.

verl pins ``transformers<5.11``, so it lives in its own venv (``scripts/verl_venv.sh``, cached
outside the clone). In the project venv this file holds one test that runs the file again under
that venv's python; there (where ``verl`` imports) it holds the real tests:

- verl's own ``compute_advantage(data, "gtpo")`` yields ``algos.advantages``' GTPO numbers on
  multi-turn responses whose turns it only knows from ``response_mask``;
- ``TIRAgentLoop`` plays a 2-turn episode of our env (real sandbox, real grader) against a
  scripted async server that speaks verl's ``server_manager.generate`` interface.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI, require

ROOT = Path(__file__).resolve().parents[1]
HAVE_VERL = importlib.util.find_spec("verl") is not None


def verl_python() -> Path:
    return Path(os.environ.get("TIR_VERL_VENV",
                               Path.home() / ".cache" / "tir-gym" / "verl-venv")) / "bin" / "python"


if not HAVE_VERL:

    @pytest.mark.timeout(900)
    def test_in_verl_venv():
        python = verl_python()
        if IN_CI and not python.exists():  # CI builds it (scripts/setup.sh does too)
            subprocess.run(["bash", str(ROOT / "scripts" / "verl_venv.sh")], check=True)
        require(python.exists(), f"no verl venv at {python.parent.parent}; create it with "
                                 "bash scripts/verl_venv.sh")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        run = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]

else:
    import asyncio

    import numpy as np
    import torch

    def _responses():
        """Two groups of multi-turn responses: (turn lengths, tool-output lengths, rewards)."""
        return [
            # group a: 2 turns right, 1 turn wrong, 3 turns right
            ("a", [3, 2], [2], [0.0, 1.0]),
            ("a", [4], [], [-0.1]),
            ("a", [2, 2, 3], [1, 3], [0.0, -0.1, 1.0]),
            # group b: both 2 turns, one right
            ("b", [2, 2], [3], [0.0, 1.0]),
            ("b", [3, 1], [2], [0.0, 0.0]),
        ]

    def _data(rewards_on: str):
        from verl import DataProto

        from algos.batch import RolloutBatch

        rows = _responses()
        L = 16
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        token_rewards = torch.zeros(len(rows), L)
        spans = []
        for i, (_, turns, tools, rewards) in enumerate(rows):
            pos, row_spans = 0, []
            for j, n in enumerate(turns):
                mask[i, pos : pos + n] = 1
                row_spans.append((pos, pos + n))
                if rewards_on == "turns":
                    token_rewards[i, pos + n - 1] = rewards[j]
                pos += n + (tools[j] if j < len(tools) else 0)
            if rewards_on == "last":
                token_rewards[i, row_spans[-1][1] - 1] = sum(rewards)
            spans.append(row_spans)
        data = DataProto.from_dict(
            tensors={"token_level_rewards": token_rewards, "response_mask": mask},
            non_tensors={"uid": np.array([r[0] for r in rows], dtype=object)})
        groups = [0 if r[0] == "a" else 1 for r in rows]
        if rewards_on == "turns":
            turn_rewards = [r[3] for r in rows]
        else:
            turn_rewards = [[0.0] * (len(r[1]) - 1) + [sum(r[3])] for r in rows]
        batch = RolloutBatch.build(groups, turn_rewards, spans, seq_len=L)
        return data, batch

    @pytest.mark.parametrize("rewards_on", ["turns", "last"])
    @pytest.mark.parametrize("gamma, scaled", [(0.9, True), (1.0, True), (0.9, False)])
    def test_compute_advantage_yields_our_gtpo(rewards_on, gamma, scaled):
        from verl.trainer.config import AlgoConfig
        from verl.trainer.ppo.ray_trainer import compute_advantage

        import algos.integrations.verl  # noqa: F401  (registers "gtpo")
        from algos.advantages import gtpo_turn_advantages
        from algos.batch import turn_to_tokens

        data, batch = _data(rewards_on)
        config = AlgoConfig(adv_estimator="gtpo", gamma=gamma, norm_adv_by_std_in_grpo=scaled)
        out = compute_advantage(data, adv_estimator="gtpo", gamma=gamma,
                                norm_adv_by_std_in_grpo=scaled, config=config)
        returns, turns = gtpo_turn_advantages(
            batch.rewards, batch.turn_mask, batch.group_ids, batch.valid, gamma,
            "turn" if scaled else "none")
        expected = turn_to_tokens(turns, batch.turn_index)
        torch.testing.assert_close(out.batch["advantages"], expected)
        torch.testing.assert_close(out.batch["returns"], turn_to_tokens(returns, batch.turn_index))
        assert out.batch["advantages"].abs().sum() > 0
        assert not out.batch["advantages"][~batch.loss_mask].any()  # tool output: no advantage

    def test_turn_scores_column_overrides_token_rewards():
        from algos.integrations.verl import compute_gtpo_advantage

        data, batch = _data("last")
        turns, _ = _data("turns")
        scores = np.empty(len(_responses()), dtype=object)
        scores[:] = [r[3] for r in _responses()]
        adv, _ = compute_gtpo_advantage(data.batch["token_level_rewards"],
                                        data.batch["response_mask"], data.non_tensor_batch["uid"],
                                        non_tensor_batch={"turn_scores": scores})
        ref, _ = compute_gtpo_advantage(turns.batch["token_level_rewards"],
                                        turns.batch["response_mask"], turns.non_tensor_batch["uid"])
        torch.testing.assert_close(adv, ref)

    class ScriptedServer:
        """verl's ``server_manager.generate`` interface, answering with scripted turns."""

        def __init__(self, tokenizer, turns):
            self.tokenizer, self.turns, self.calls = tokenizer, list(turns), []

        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            from verl.workers.rollout.replica import TokenOutput

            self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids),
                               "sampling_params": dict(sampling_params)})
            ids = self.tokenizer(self.turns.pop(0), add_special_tokens=False)["input_ids"]
            return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")

    def test_agent_loop_plays_a_two_turn_episode(tmp_path):
        from omegaconf import OmegaConf
        from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry
        from verl.utils.dataset.rl_dataset import RLHFDataset

        from algos.integrations.verl import TIRAgentLoop, compute_gtpo_advantage
        from algos.tiny import tiny_tokenizer

        assert _agent_loop_registry["tir_agent"]["_target_"].endswith("verl.TIRAgentLoop")
        problems = tmp_path / "p.jsonl"
        problems.write_text(json.dumps({"id": "p0", "question": "Compute 6*7.", "answer": "42"}))
        tokenizer = tiny_tokenizer()
        code = "Let me compute.\n```python\nprint(6 * 7)\n```\n"
        server = ScriptedServer(tokenizer, [code, "So \\boxed{42}.<|im_end|>"])
        config = OmegaConf.create({"actor_rollout_ref": {"rollout": {
            "prompt_length": 256, "response_length": 128}}})
        loop = TIRAgentLoop(
            trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer,
            processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(OmegaConf.create({})),
            env_kwargs={"problems": str(problems)}, max_turns=3)
        out = asyncio.run(loop.run({"temperature": 1.0, "logprobs": True},
                                   extra_info={"problem_id": "file/p0"}))

        assert out.extra_fields["turn_scores"] == [0.0, 1.0] and out.reward_score == 1.0
        assert out.extra_fields["correct"] is True
        code_ids = tokenizer(code, add_special_tokens=False)["input_ids"]
        (a, b), (c, d) = out.extra_fields["turn_spans"]
        assert out.response_ids[a:b] == code_ids
        tool = tokenizer.decode(out.response_ids[b:c])
        assert tool.startswith("```output\n42") and set(out.response_mask[b:c]) == {0}
        assert set(out.response_mask[a:b]) == set(out.response_mask[c:d]) == {1}
        assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs) == d
        # Turn 2 continues turn 1's exact tokens plus the tool output: token in, token out.
        assert server.calls[1]["prompt_ids"] == out.prompt_ids + out.response_ids[:c]
        assert server.calls[0]["request_id"] == server.calls[1]["request_id"]
        assert server.calls[0]["sampling_params"]["stop"] == ["```\n"]
        # The episode's tensors feed the estimator: one turn boundary per run of the mask.
        mask = torch.tensor([out.response_mask])
        rewards = torch.zeros(1, d)
        rewards[0, d - 1] = out.reward_score
        adv, _ = compute_gtpo_advantage(rewards, mask, np.array(["g"], dtype=object))
        assert adv.shape == (1, d) and not adv.any()  # a group of one carries no preference
