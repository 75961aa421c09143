"""SkyRL-gym and GEM adapters: their own ``make`` returns our env, with sandbox and turn rewards.

Each framework's real registry and (for GEM) real vector envs; our real local sandbox and grader.
"""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import require

try:
    import skyrl_gym
except ImportError:  # the [skyrl] extra is not installed
    skyrl_gym = None
try:
    import gem
except ImportError:  # the [gem] extra is not installed
    gem = None

pytestmark = pytest.mark.timeout(120)

PROBLEMS = {"p0": ("Compute 6*7.", "42"), "p1": ("Compute 2**10.", "1024")}


def code(text: str) -> str:
    return f"Let me compute.\n```python\n{text}\n```\n"


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "p.jsonl"
    path.write_text("".join(json.dumps({"id": k, "question": q, "answer": a}) + "\n"
                            for k, (q, a) in PROBLEMS.items()))
    return str(path)


# --------------------------------------------------------------------------- SkyRL-gym


@pytest.fixture(scope="module")
def skyrl():
    require(skyrl_gym is not None, "skyrl-gym is not installed (pip install -e .[skyrl])")
    import tir_envs.integrations.skyrl  # noqa: F401  (registers the ids)

    return skyrl_gym


def test_skyrl_episode(skyrl, problems):
    from omegaconf import OmegaConf

    from tir_envs.integrations.skyrl import TIRSkyRLEnv

    config = OmegaConf.create({"problems": problems, "max_turns": 3})  # as SkyRL passes it
    env = skyrl.make("TIR-Math-v0", env_config=config, extras={"problem_id": "file/p0"})
    assert isinstance(env, TIRSkyRLEnv) and env.max_turns == 3
    messages, info = env.init([{"role": "user", "content": "ignored: the env renders its own"}])
    assert messages[-1] == {"role": "user", "content": "Compute 6*7."}
    assert info["problem_id"] == "file/p0"

    out = env.step(code("x = 6 * 7\nprint(x)"))
    assert not out["done"] and out["reward"] == 0.0
    assert out["observations"] == [{"role": "user", "content": "```output\n42\n```\n"}]
    assert out["metadata"]["exec"]["status"] == "ok" and out["metadata"]["tool_called"]
    out = env.step(code("print(x + 1)"))  # the kernel keeps state across turns
    assert out["observations"][0]["content"] == "```output\n43\n```\n"
    out = env.step("So the answer is \\boxed{42}.")
    assert out["done"] and out["reward"] == 1.0 and out["observations"] == []
    assert out["metadata"]["reward_components"]["accuracy"] == 1.0
    assert env.get_metrics() == {"turns": 3, "return": 1.0, "correct": 1.0}
    env.close()


def test_skyrl_truncation_and_format_penalty(skyrl, problems):
    env = skyrl.make("TIR-Math-v0", env_config={"problems": problems, "max_turns": 2},
                     extras={"extra_info": {"problem_id": "file/p1"}})
    env.init()
    first = env.step(code("print(2**10)"))
    second = env.step("```python\nprint(")  # an unclosed fence: penalised, episode truncated
    assert not first["done"] and second["done"]
    assert second["reward"] == pytest.approx(-0.1)
    assert second["metadata"]["format_error"] == "unclosed_fence"
    env.close()


def test_skyrl_group_runs_concurrently(skyrl, problems):
    """A group: G envs of one row play one problem, stepped from threads as SkyRL's generator
    does, each in its own kernel (no state leaks between them)."""
    envs = [skyrl.make("TIR-Math-v0", env_config={"problems": problems},
                       extras={"problem_id": "file/p1"}) for _ in range(4)]
    prompts = [env.init()[0] for env in envs]
    assert all(p == prompts[0] for p in prompts) and "2**10" in prompts[0][-1]["content"]

    def episode(k):
        env = envs[k]
        env.step(code(f"v = {k}"))
        out = env.step(code("print(v)"))
        last = env.step("\\boxed{1024}" if k % 2 else "\\boxed{1000}")
        return out["observations"][0]["content"], last["reward"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(episode, range(4)))
    assert [r[0] for r in results] == [f"```output\n{k}\n```\n" for k in range(4)]
    assert [r[1] for r in results] == [0.0, 1.0, 0.0, 1.0]
    for env in envs:
        env.close()


# --------------------------------------------------------------------------- GEM


@pytest.fixture(scope="module")
def gem_api():
    require(gem is not None, "gem-llm is not installed (pip install -e .[gem])")
    import tir_envs.integrations.gem  # noqa: F401  (registers the ids)

    return gem


def test_gem_episode_and_seeding(gem_api):
    from tir_envs.integrations.gem import TIRGemEnv

    env = gem_api.make("TIR-Math-v0", seed=3, max_turns=2)
    assert isinstance(env, TIRGemEnv)
    obs, info = env.reset()
    again = gem_api.make("TIR-Math-v0", seed=3)
    assert again.reset()[0] == obs  # the constructor's seed drives the first reset
    assert env.reset(seed=3)[0] == obs
    obs, reward, terminated, truncated, info = env.step(code("print(1 + 1)"))
    assert obs == "```output\n2\n```\n" and reward == 0.0 and not (terminated or truncated)
    obs, reward, terminated, truncated, info = env.step(code("print(2)"))
    assert truncated and not terminated  # max_turns=2
    env.close()
    again.close()


def test_gem_spawn_makes_a_group(gem_api, problems):
    env = gem_api.make("TIR-Math-v0", problems=problems, seed=0)
    obs, info = env.reset()
    group = [env.spawn(same_state=True) for _ in range(3)]
    for member in group:
        m_obs, m_info = member.reset()
        assert m_obs == obs and m_info["problem_id"] == info["problem_id"]
        answer = PROBLEMS[info["problem_id"].split("/")[1]][1]
        assert member.step(f"\\boxed{{{answer}}}")[1] == pytest.approx(0.9)  # right, no tool
        member.close()
    env.close()


@pytest.mark.parametrize("async_mode", [False, True])
def test_gem_make_vec_groups(gem_api, problems, async_mode):
    ids = ["file/p0", "file/p0", "file/p1", "file/p1"]  # two groups of two
    vec = gem_api.make_vec(["TIR-Math-v0"] * 4, vec_kwargs=[{"problem_id": i} for i in ids],
                           async_mode=async_mode, problems=problems, max_turns=3)
    obs, infos = vec.reset()
    assert [i["problem_id"] for i in infos] == ids and obs[0] == obs[1] != obs[2] == obs[3]
    obs, rewards, terminated, truncated, infos = vec.step(
        [code(f"print({k} * 10)") for k in range(4)])
    assert list(obs) == [f"```output\n{k * 10}\n```\n" for k in range(4)]
    assert list(rewards) == [0.0] * 4 and not terminated.any()
    answers = ["\\boxed{42}", "\\boxed{41}", "\\boxed{1024}", "\\boxed{1024}"]
    obs, rewards, terminated, truncated, infos = vec.step(answers)
    assert list(rewards) == [1.0, 0.0, 1.0, 1.0] and terminated.all()
    # GEM's vector envs reset a finished env in the same step: obs and info are the next
    # episode's (back at the pinned problem); the final turn's reward is what survives.
    assert "6*7" in obs[0] and "2**10" in obs[3] and [i["turn"] for i in infos] == [0] * 4
    for env in vec.envs:  # GEM's vector envs have no close() of their own
        env.close()


@pytest.mark.parametrize("module, framework", [("skyrl", "skyrl_gym"), ("gem", "gem")])
def test_each_adapter_imports_without_the_other_frameworks(module, framework):
    import subprocess
    import sys

    require(importlib.util.find_spec(framework) is not None, f"{framework} is not installed")
    others = [m for m in ("skyrl_gym", "gem", "trl", "verl") if m != framework]
    script = (f"import sys; sys.modules.update(dict.fromkeys({others!r})); "
              f"import tir_envs.integrations.{module}")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
