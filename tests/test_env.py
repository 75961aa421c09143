"""TIRMathEnv against the real local sandbox and the real grader: the env contract end to end."""

from __future__ import annotations

import contextlib
import gc
import os
import time

import gymnasium as gym
import numpy as np
import psutil
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env

import tir_envs
from tir_envs.data import Problem
from tir_envs.env import TIRMathEnv
from tir_envs.procedural import KINDS, from_id, oracle_turn
from tir_envs.rewards import TurnReward
from tir_envs.sandbox import make_sandbox

BENCHMARK_IDS = [env_id for env_id in tir_envs.ENV_IDS if env_id != "TIR-Math-v0"]


@pytest.fixture(scope="module")
def sandbox():
    """One warm local sandbox shared by the single-env tests (envs never close a shared sandbox)."""
    with make_sandbox("local") as box:
        yield box


@pytest.fixture
def env(sandbox):
    env = gym.make("TIR-Math-v0", sandbox=sandbox)
    yield env
    env.close()


def tool(code: str) -> str:
    return f"Let me compute.\n```python\n{code}\n```"


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def started_since(before: set[int]) -> set[int]:
    """Our descendants started after ``before`` was taken, except those hanging off a process that
    was already there (a shared sandbox refilling its prestarted kernels is not a leak)."""
    me, new = os.getpid(), set()
    for pid in descendants() - before:
        with contextlib.suppress(psutil.NoSuchProcess):
            ancestor = psutil.Process(pid).ppid()
            while ancestor != me and ancestor not in before and ancestor > 1:
                ancestor = psutil.Process(ancestor).ppid()
            if ancestor == me:
                new.add(pid)
    return new


def _describe(pids: set[int]) -> str:
    lines = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            lines.append(f"{pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:120]}")
    return "left behind:\n" + "\n".join(lines)


def open_fds() -> int:
    return psutil.Process().num_fds()


# ---------------------------------------------------------------------------- registration, API


def test_every_id_is_registered_with_max_turns():
    for env_id in tir_envs.ENV_IDS:
        spec = gym.spec(env_id)
        assert spec.max_episode_steps == tir_envs.DEFAULT_MAX_TURNS
        assert spec.entry_point == "tir_envs.env:TIRMathEnv"


def test_module_prefixed_id_works():
    env = gym.make("tir_envs:TIR-Math-v0")
    obs, info = env.reset(seed=0)
    assert info["problem_id"].startswith("proc/")
    env.close()


def test_benchmark_ids_make_without_data_and_fail_clearly_at_reset(tmp_path, monkeypatch):
    monkeypatch.delenv("TIR_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub fallback either
    env = gym.make("TIR-AIME24-v0", data_dir=tmp_path)  # nothing read yet
    with pytest.raises((FileNotFoundError, OSError, ValueError), match="aime24"):
        env.reset()
    env.close()


def test_check_env_procedural():
    env = gym.make("TIR-Math-v0")
    check_env(env.unwrapped)
    env.close()


@pytest.mark.parametrize("env_id", BENCHMARK_IDS)
def test_check_env_benchmarks(env_id, benchmarks_dir, sample_benchmarks_dir):
    """The shared files where they exist, else a few real records of the added benchmarks."""
    shared = (benchmarks_dir / f"{tir_envs.ENV_IDS[env_id]}.jsonl").is_file()
    env = gym.make(env_id, data_dir=benchmarks_dir if shared else sample_benchmarks_dir)
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert info["source"] and info["problem_id"]
    env.close()


def test_benchmark_ids_read_tir_data_dir(benchmarks_dir, monkeypatch):
    monkeypatch.setenv("TIR_DATA_DIR", str(benchmarks_dir))
    env = gym.make("TIR-GSM8K-v0")
    obs, info = env.reset(options={"problem_index": 0})
    assert "ducks" in obs
    env.close()


def test_user_file_as_problem_source(tmp_path, sandbox):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"q": "What is 6 times 7?", "a": "42", "key": "p1"}\n')
    env = gym.make(
        "TIR-Math-v0",
        problems=str(path),
        fields={"question_field": "q", "answer_field": "a", "id_field": "key"},
        sandbox=sandbox,
    )
    obs, info = env.reset()
    assert "6 times 7" in obs and "42" not in obs
    obs, reward, terminated, _, info = env.step("\\boxed{42}")
    assert terminated and info["correct"] and reward == pytest.approx(0.9)  # no tool call on turn 1
    env.close()


def test_list_of_problems_as_source(sandbox):
    problems = [
        Problem(id="mine/a", question="What is 2^10?", answer="1024", source="mine", meta={}),
        Problem(id="mine/b", question="What is 3^5?", answer="243", source="mine", meta={}),
    ]
    env = TIRMathEnv(problems=problems, sandbox=sandbox)
    obs, info = env.reset(options={"problem_id": "mine/b"})
    assert info["problem_id"] == "mine/b" and info["source"] == "mine" and "3^5" in obs
    env.step(tool("print(3**5)"))
    assert env.step("\\boxed{243}")[4]["correct"]
    env.close()


def test_spaces_accept_any_text():
    env = TIRMathEnv()
    for text in ["", "αβγ ∑ 中文 😀 \u200b \U0001f600", "\x00\t\n", "a" * 1000]:
        assert text in env.action_space and text in env.observation_space
    assert "a" * (env.max_action_chars + 1) not in env.action_space
    assert b"bytes" not in env.action_space
    env.close()


# ---------------------------------------------------------------------------- reset


def test_seeded_reset_is_reproducible(env):
    first = env.reset(seed=7)[1]["problem_id"]
    assert env.reset(seed=7)[1]["problem_id"] == first
    assert len({env.reset()[1]["problem_id"] for _ in range(10)}) > 1


def test_pinning_a_problem(env):
    obs, info = env.reset(options={"problem_id": "proc/modpow/3"})
    assert info["problem_id"] == "proc/modpow/3" and obs.endswith(
        from_id("proc/modpow/3").question + "\n"
    )
    assert (
        env.reset(options={"problem_index": 5})[1]["problem_id"] == env.unwrapped.source.get(5).id
    )
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"problem_idx": 5})
    with pytest.raises(ValueError, match="not both"):
        env.reset(options={"problem_id": "proc/modpow/3", "problem_index": 1})
    with pytest.raises(KeyError):
        env.reset(options={"problem_id": "proc/nonsense/3"})


def test_gold_answer_is_never_observed(env):
    for index in range(3 * len(KINDS)):
        obs, info = env.reset(options={"problem_index": index})
        answer = from_id(info["problem_id"]).answer
        if len(answer) >= 6:  # a short answer can occur in the question by chance ("by 7")
            assert answer not in obs and answer not in repr(info)


def test_prompt_through_a_real_chat_template():
    from algos.tiny import tiny_tokenizer  # a locally trained ChatML tokenizer; imports torch

    env = gym.make("TIR-Math-v0", tokenizer=tiny_tokenizer())
    obs, info = env.reset(options={"problem_id": "proc/gcd_lcm/2"})
    assert obs.startswith("<|im_start|>system\n") and obs.endswith("<|im_start|>assistant\n")
    assert from_id("proc/gcd_lcm/2").question in obs
    env.close()


def test_reset_info_carries_chat_messages(env):
    obs, info = env.reset(seed=1)
    assert [m["role"] for m in info["messages"]] == ["system", "user"]
    assert info["turn"] == 0


# ---------------------------------------------------------------- the oracle and the turns


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_oracle_solves_every_kind(env, kind):
    for seed in range(2):
        problem_id = f"proc/{kind}/{seed}"
        obs, info = env.reset(options={"problem_id": problem_id})
        rewards = []
        obs, reward, terminated, truncated, info = env.step(oracle_turn(problem_id, obs))
        rewards.append(reward)
        assert info["exec"]["status"] == "ok", info["exec"]
        assert info["tool_called"] and not terminated and not truncated
        obs, reward, terminated, truncated, info = env.step(oracle_turn(problem_id, obs))
        rewards.append(reward)
        assert terminated and not truncated and info["correct"], (problem_id, info)
        assert info["grading"] in ("exact", "number", "math_verify")
        assert rewards == [0.0, 1.0] and obs == ""


def test_state_persists_across_turns(env):
    env.reset(seed=0)
    env.step(tool("import math\nx = math.factorial(20)"))
    obs, *_, info = env.step(tool("print(x % 1000003)"))
    assert obs == f"```output\n{2432902008176640000 % 1000003}\n```\n"
    obs, *_ = env.step(tool("x // 10**15"))  # a trailing expression is displayed
    assert obs == "```output\n2432\n```\n"


def test_wrong_answer(env):
    env.reset(options={"problem_id": "proc/binomial/1"})
    env.step(tool("print(1)"))
    obs, reward, terminated, truncated, info = env.step("I think it is \\boxed{1}.")
    assert terminated and info["correct"] is False and info["final_answer"] == "1"
    assert reward == 0.0 and info["reward_components"]["accuracy"] == 0.0


def test_final_turn_without_a_box(env):
    env.reset(seed=3)
    env.step(tool("print(2)"))
    obs, reward, terminated, _, info = env.step("I could not finish.")
    assert (
        terminated and info["final_answer"] is None and info["correct"] is False and reward == 0.0
    )
    assert info["grading"] == "empty"


def test_answer_without_tool_call_on_first_turn_is_penalized(env):
    obs, info = env.reset(options={"problem_id": "proc/modpow/2"})
    answer = from_id("proc/modpow/2").answer
    obs, reward, terminated, _, info = env.step(f"\\boxed{{{answer}}}")
    assert terminated and info["correct"] and not info["tool_called"]
    assert info["reward_components"] == {"accuracy": 1.0, "format": -0.1, "execution": 0.0}
    assert reward == pytest.approx(0.9)


def test_crash_in_code(env):
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(tool("x = 1\nprint('before')\n1 / 0"))
    assert info["exec"]["status"] == "error" and "ZeroDivisionError" in info["exec"]["stderr"]
    assert "before" in obs and "ZeroDivisionError" in obs
    assert reward == 0.0 and not terminated and not truncated
    obs, *_ = env.step(tool("print(x + 1)"))  # the kernel survived the exception
    assert obs == "```output\n2\n```\n"


def test_timeout_in_code(sandbox):
    env = gym.make("TIR-Math-v0", sandbox=sandbox, exec_timeout_s=1.0)
    env.reset(seed=0)
    start = time.monotonic()
    obs, reward, terminated, truncated, info = env.step(tool("while True:\n    pass"))
    assert time.monotonic() - start < 10
    assert info["exec"]["status"] == "timeout" and "TimeoutError" in obs
    assert reward == 0.0 and not terminated
    obs, reward, *_, info = env.step(tool("print('still here')"))
    assert info["exec"]["status"] == "ok" and "still here" in obs
    env.close()


@pytest.mark.parametrize(
    "action, error, status",
    [
        ("```python\nprint(1)", "unclosed_fence", "not_run"),
        ("```python\n\n```", "empty_code", "not_run"),
        ("```python\nprint(1\n```", "syntax_error", "error"),
    ],
)
def test_invalid_tool_calls(env, action, error, status):
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(action)
    assert (
        info["format_error"] == error and info["exec"]["status"] == status and info["tool_called"]
    )
    assert reward == pytest.approx(-0.1) and not terminated
    assert obs.startswith("```output\n")
    if error == "syntax_error":
        assert "SyntaxError" in obs


def test_truncation_at_max_turns(sandbox):
    env = gym.make("TIR-Math-v0", sandbox=sandbox, max_turns=3, max_episode_steps=3)
    env.reset(seed=0)
    results = [env.step(tool(f"print({i})")) for i in range(3)]
    assert [r[3] for r in results] == [False, False, True]
    assert not any(r[2] for r in results)
    with pytest.raises(ResetNeeded, match="reset"):
        env.step("\\boxed{1}")
    env.close()


def test_step_after_termination_and_before_reset(sandbox):
    env = TIRMathEnv(sandbox=sandbox)
    with pytest.raises(ResetNeeded, match="reset"):
        env.step("hi")
    env.reset(seed=0)
    env.step("\\boxed{0}")
    with pytest.raises(ResetNeeded, match="ended"):
        env.step("\\boxed{0}")
    env.reset(seed=0)
    assert env.step(tool("print(5)"))[0] == "```output\n5\n```\n"  # usable again
    env.close()


@pytest.mark.parametrize(
    "action", [None, 42, b"```python\nprint(1)\n```", ["text"], np.array(["x"])]
)
def test_non_string_action(env, action):
    env.reset(seed=0)
    with pytest.raises(TypeError, match="action must be a str"):
        env.unwrapped.step(action)
    assert env.step(tool("print(1)"))[4]["exec"]["status"] == "ok"


def test_megabyte_action(env):
    env.reset(seed=0)
    huge = tool("x = 1\n" + "# pad\n" * 200_000)
    assert len(huge) > 1_000_000
    obs, reward, terminated, truncated, info = env.step(huge)
    assert info["format_error"] == "action_too_long" and info["exec"]["status"] == "not_run"
    assert reward == pytest.approx(-0.1) and not terminated and "not run" in obs
    assert env.step(tool("print(3)"))[0] == "```output\n3\n```\n"


def test_odd_unicode(env):
    env.reset(seed=0)
    obs, *_, info = env.step(tool("s = 'π≈3.14 中文 😀 \\u200b\\u202e'\nprint(s, len(s))"))
    assert info["exec"]["status"] == "ok" and "中文 😀" in obs
    obs, *_, info = env.step(tool("print('\ud800')"))  # a lone surrogate cannot even be encoded
    assert info["format_error"] == "syntax_error"
    obs, *_, info = env.step(
        tool("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe bad bytes\\n')")
    )
    assert info["exec"]["status"] in ("ok", "error") and isinstance(obs, str)
    obs, reward, terminated, _, info = env.step("\\boxed{😀\ud800\u202e}")
    assert terminated and info["correct"] is False


def test_reset_mid_episode_closes_the_session():
    env = gym.make("TIR-Math-v0")
    env.reset(seed=0)
    env.step(tool("x = 41"))
    session = env.unwrapped._session
    assert session is not None
    env.reset(seed=1)
    assert env.unwrapped._session is None
    obs, *_ = env.step(tool("print('x' in globals())"))
    assert obs == "```output\nFalse\n```\n"  # nothing leaks across episodes
    env.close()


def test_close_releases_everything():
    before = descendants()
    env = gym.make("TIR-Math-v0")
    env.reset(seed=0)
    env.step(tool("print(1)"))
    assert started_since(before)  # a sandbox is running
    env.close()
    env.close()  # twice is fine
    assert _settled(lambda: not started_since(before)), _describe(started_since(before))
    with pytest.raises(ResetNeeded):
        env.step(tool("print(1)"))  # must not quietly start a new sandbox


def test_shared_sandbox_is_not_closed_by_the_env(sandbox):
    env = gym.make("TIR-Math-v0", sandbox=sandbox)
    env.reset(seed=0)
    env.step(tool("print(1)"))
    env.close()
    assert sandbox.run("print(2)").stdout == "2\n"


def test_infra_error_is_reported_not_penalized():
    env = gym.make("TIR-Math-v0")
    env.reset(seed=0)
    env.step(tool("x = 1"))  # starts the env's own sandbox
    env.unwrapped._sandbox.close()  # the sandbox breaks under the env: not the model's fault
    obs, reward, terminated, truncated, info = env.step(tool("print(2)"))
    assert info["exec"]["status"] == "infra_error", info["exec"]
    assert "SandboxError" in info["exec"]["stderr"] and "SandboxError" in obs
    assert reward == 0.0 and info["reward_components"]["format"] == 0.0 and not terminated
    # The env stays usable: its own broken sandbox is replaced, with a fresh kernel.
    obs, reward, terminated, truncated, info = env.step(tool("print('x' in globals())"))
    assert info["exec"]["status"] == "ok" and obs == "```output\nFalse\n```\n"
    env.close()


def test_broken_shared_sandbox_gives_infra_errors_and_no_crash():
    box = make_sandbox("local")
    env = gym.make("TIR-Math-v0", sandbox=box)
    env.reset(seed=0)
    box.close()
    for _ in range(2):
        obs, reward, terminated, truncated, info = env.step(tool("print(1)"))
        assert info["exec"]["status"] == "infra_error" and reward == 0.0
    obs, reward, terminated, truncated, info = env.step("\\boxed{1}")
    assert terminated
    env.close()


def test_reward_weights_and_custom_reward_fn(sandbox):
    env = gym.make(
        "TIR-Math-v0", sandbox=sandbox, reward_weights={"no_tool_call": 0.0, "correct": 5.0}
    )
    env.reset(options={"problem_id": "proc/binomial/0"})
    answer = from_id("proc/binomial/0").answer
    assert env.step(f"\\boxed{{{answer}}}")[1] == 5.0
    env.close()

    base = TurnReward()
    env = gym.make(
        "TIR-Math-v0",
        sandbox=sandbox,
        reward_fn=lambda o: {**base(o), "length": -0.001 * len(o.action)},
    )
    env.reset(seed=0)
    obs, reward, *_, info = env.step("x" * 100)
    assert info["reward_components"]["length"] == pytest.approx(-0.1)
    assert reward == pytest.approx(-0.2)
    env.close()
    with pytest.raises(ValueError, match="not both"):
        TIRMathEnv(reward_fn=base, reward_weights={"correct": 1.0})


def test_render_ansi_is_the_transcript(sandbox):
    env = gym.make("TIR-Math-v0", sandbox=sandbox, render_mode="ansi")
    obs, _ = env.reset(seed=0)
    env.step(tool("print(6 * 7)"))
    text = env.render()
    assert text.startswith(obs) and text.endswith("```output\n42\n```\n")
    env.close()


# ---------------------------------------------------------------------------- vector envs


def _run_oracle(vec_env, episodes: int, seed: int = 0) -> list[float]:
    """Roll the oracle until ``episodes`` have ended; returns each episode's return."""
    obs, infos = vec_env.reset(seed=seed)
    ids = list(infos["problem_id"])
    returns, running = [], np.zeros(vec_env.num_envs)
    autoreset = np.zeros(vec_env.num_envs, dtype=bool)
    while len(returns) < episodes:
        actions = [oracle_turn(pid, o) for o, pid in zip(obs, ids)]
        obs, rewards, terminated, truncated, infos = vec_env.step(actions)
        for i in range(vec_env.num_envs):
            if autoreset[i]:  # this step was a reset: obs is a prompt, info a reset info
                running[i] = 0.0
            else:
                running[i] += rewards[i]
                if terminated[i] or truncated[i]:
                    returns.append(running[i])
            ids[i] = infos["problem_id"][i]
        autoreset = terminated | truncated
    return returns


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs_run_the_oracle_with_autoreset(mode):
    before = descendants()
    vec_env = gym.make_vec("TIR-Math-v0", num_envs=2, vectorization_mode=mode)
    returns = _run_oracle(vec_env, episodes=8)
    assert returns[:8] == [1.0] * 8
    vec_env.close()
    assert _settled(lambda: not started_since(before)), _describe(started_since(before))


def test_async_observations_carry_any_text():
    """Async workers return text through shared memory: every step's text must arrive intact."""
    actions = [
        tool("print('中文 😀 \\u202e rtl \\x00 nul', 'é' * 3)"),
        tool("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe raw bytes\\n')"),
        tool("print('x' * 5000)"),  # cut in the middle to max_output_chars
    ]
    seen = {}
    for mode in ("sync", "async"):
        vec_env = gym.make_vec("TIR-Math-v0", num_envs=2, vectorization_mode=mode)
        obs, _ = vec_env.reset(options={"problem_id": "proc/binomial/0"})
        seen[mode] = [tuple(obs)] + [tuple(vec_env.step([a, a])[0]) for a in actions]
        vec_env.close()
    assert seen["async"] == seen["sync"]
    assert "中文 😀 \u202e rtl \x00 nul ééé" in seen["async"][1][0]
    assert "characters truncated" in seen["async"][3][1]


def test_vector_env_groups_share_one_problem():
    vec_env = gym.make_vec("TIR-Math-v0", num_envs=3, vectorization_mode="sync")
    obs, infos = vec_env.reset(options={"problem_id": "proc/crt/4"})
    assert list(infos["problem_id"]) == ["proc/crt/4"] * 3 and len(set(obs)) == 1
    vec_env.close()


def _oracle_through(mode: str, num_envs: int, episodes: int) -> list[float]:
    vec_env = gym.make_vec("TIR-Math-v0", num_envs=num_envs, vectorization_mode=mode)
    returns = _run_oracle(vec_env, episodes=episodes, seed=1)
    vec_env.close()
    del vec_env  # worker handles (process sentinels) are released with the object
    gc.collect()
    return returns


@pytest.mark.slow
def test_thousand_episodes_leave_nothing_behind():
    # A first small run allocates what lives as long as the process (multiprocessing's shared
    # memory arena); the baseline is taken after it, so anything that grows per episode shows.
    _oracle_through("async", num_envs=4, episodes=8)
    procs, fds = descendants(), open_fds()
    returns = _oracle_through("async", num_envs=4, episodes=1000)
    assert len(returns) >= 1000 and np.mean(returns) == 1.0
    assert _settled(lambda: not started_since(procs)), _describe(started_since(procs))
    assert _settled(lambda: open_fds() <= fds), (fds, open_fds())


def _settled(check, timeout_s: float = 5.0) -> bool:
    """Processes take a moment to be reaped after close; poll instead of sleeping blindly."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
