"""Ray env workers (``tir_envs.integrations.ray``) on a real local Ray instance: the same results
as ``SyncVectorEnv``, per-episode futures, the sandbox's isolation inside actors, a killed actor
replaced with its episode ended as an infra error, and a training run through it."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from algos.rollout import RolloutConfig, Trajectory, Turn, make_vec_env, unbatch_info
from algos.tiny import save_tiny, tiny_tokenizer
from tests.conftest import require
from tests.test_sandbox import _docker_unavailable_reason, _namespaces_expected

pytestmark = pytest.mark.timeout(180)

ROLLOUT = RolloutConfig(max_new_tokens=16, max_turns=2, max_total_tokens=768)
RAY = {"env_workers": "ray", "ray_options": {"envs_per_actor": 2}}


def code(source: str) -> str:
    return f"Let me compute.\n```python\n{source}\n```\n"


@pytest.fixture(scope="module")
def ray():
    try:
        import ray
    except ImportError:
        require(False, "ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ray_env(ray, tokenizer):
    """Four envs in two actors, made the way training makes them."""
    vec_env, sandbox = make_vec_env("TIR-Math-v0", 4, tokenizer, ROLLOUT, RAY)
    assert sandbox is None
    yield vec_env
    vec_env.close()


def actor_pid(ray, actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda host: os.getpid()))


def comparable(infos: dict, index: int) -> dict:
    """Env ``index``'s info without what only timing changes."""
    info = unbatch_info(infos, index)
    info.get("exec", {}).pop("duration_s", None)
    return info


def test_same_results_as_sync_vector_env_for_a_scripted_policy(ray_env, tokenizer):
    from tir_envs.integrations.ray import RayVectorEnv

    assert isinstance(ray_env, RayVectorEnv)
    sync_env, sandbox = make_vec_env("TIR-Math-v0", 4, tokenizer, ROLLOUT)
    try:
        assert ray_env.single_action_space == sync_env.single_action_space
        assert ray_env.single_observation_space == sync_env.single_observation_space
        assert ray_env.metadata["autoreset_mode"] == sync_env.metadata["autoreset_mode"]
        first = [env.reset(seed=7) for env in (sync_env, ray_env)]
        pinned = first[0][1]["problem_id"][2]
        answer = ray_env.get_attr("source")[0].get(pinned).answer
        mask = np.array([True, True, False, False])
        resets = [env.reset(options={"problem_id": pinned, "reset_mask": mask})
                  for env in (sync_env, ray_env)]
        boxed = f"So the answer is \\boxed{{{answer}}}."
        script = [
            (code("x = 6 * 7\nprint(x)"), boxed, "```python\nprint(1", code("1 / 0")),
            (code("print(x + 1)"), "", boxed, "I give up."),
            ("", code("import math\nprint(math.factorial(5))"), "", ""),
            (code("print(sum(range(10)))"), "no code here", boxed, code("y = [1, 2]\ny")),
        ]
        steps = [[env.step(actions) for env in (sync_env, ray_env)] for actions in script]
    finally:
        sync_env.close()
        sandbox.close()

    for (sync_obs, sync_info), (ray_obs, ray_info) in (first, resets):
        assert ray_obs == sync_obs
        for i in range(4):
            assert comparable(ray_info, i) == comparable(sync_info, i)
    for sync_step, ray_step in steps:
        assert ray_step[0] == sync_step[0]
        for sync_array, ray_array in zip(sync_step[1:4], ray_step[1:4]):
            np.testing.assert_array_equal(ray_array, sync_array)
        for i in range(4):
            assert comparable(ray_step[4], i) == comparable(sync_step[4], i)
    # The script reached what it was written for: state kept across turns, a correct answer
    # rewarded, an error run, a truncation and autoresets.
    (obs1, rewards1, _, _, info1), (obs2, _, terminated2, truncated2, _) = \
        steps[0][1], steps[1][1]
    assert obs1[0] == "```output\n42\n```\n" and "ZeroDivisionError" in obs1[3]
    assert info1["correct"][1] and rewards1[1] == pytest.approx(0.9)  # 1 - 0.1: no tool call
    assert obs2[0] == "```output\n43\n```\n" and truncated2[0] and terminated2[2]
    assert "Solve the math problem" in steps[2][1][0][0]  # autoreset: a new prompt


def test_steps_run_in_parallel_across_and_within_actors(ray_env):
    ray_env.reset(seed=1)
    started = time.perf_counter()
    obs, *_ = ray_env.step((code("import time\ntime.sleep(1.5)\nprint('slept')"),) * 4)
    elapsed = time.perf_counter() - started
    assert obs == ("```output\nslept\n```\n",) * 4
    assert elapsed < 4.0, f"4 envs sleeping 1.5 s each took {elapsed:.1f} s: not in parallel"


def test_env_pool_gives_each_episode_its_own_future(ray_env):
    pool = ray_env.env_pool()
    assert pool.num_envs == 4
    obs0, info0 = pool.reset(0, {"problem_id": "proc/modpow/1"})
    _, info3 = pool.reset(3, {"problem_id": "proc/nth_prime/2"})
    assert info0["problem_id"] == "proc/modpow/1" and info3["problem_id"] == "proc/nth_prime/2"
    slow = pool.step(0, code("import time\ntime.sleep(3.0)\nprint('late')"))
    fast = pool.step(3, code("print(7 * 6)"))
    assert fast.result(timeout=30)[0] == "```output\n42\n```\n"
    assert not slow.done(), "an episode waited for another one"
    obs, reward, terminated, truncated, info = slow.result(timeout=30)
    assert obs == "```output\nlate\n```\n" and info["turn"] == 1 and info["exec"]["status"] == "ok"
    assert not terminated and not truncated and reward == 0.0
    final = pool.step(3, "It is \\boxed{0}.").result(timeout=30)
    assert final[2] and final[4]["final_answer"] == "0"
    with pytest.raises(TypeError, match="action must be a str"):
        pool.step(0, 123).result(timeout=30)
    with pytest.raises(IndexError):
        pool.step(4, "x")
    assert pool.step(0, code("print('still usable')")).result(timeout=30)[0] == \
        "```output\nstill usable\n```\n"


def test_sandbox_isolation_holds_inside_actors(ray, tokenizer, host_listener):
    require(os.geteuid() == 0 and _namespaces_expected(),
            "full isolation is only expected as root with user namespaces enabled")
    from tir_envs.integrations.ray import RayVectorEnv

    vec_env = RayVectorEnv("TIR-Math-v0", 1, max_turns=8, max_episode_steps=8,
                           sandbox_kwargs={"require_isolation": True, "timeout_s": 5.0})
    try:
        actor = vec_env.env_pool().actor(0)
        layers = ray.get(actor.__ray_call__.remote(lambda host: host.sandbox.isolation.layers))
        assert layers and all(layers.values()), layers
        pid = actor_pid(ray, actor)
        canary = f"tir-canary-{uuid.uuid4().hex[:12]}"
        project = Path(__file__).resolve().parents[1]
        port = host_listener.getsockname()[1]
        vec_env.reset(seed=0)
        hostile = [
            "import os, socket\nprint(os.getpid(), socket.if_nameindex())",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "print('CONNECTED')",
            "for target in ('/{0}', '/tmp/../{0}', {1!r} + '/{0}'):\n"
            "    try:\n"
            "        open(target, 'w').write('owned')\n"
            "        print('WROTE', target)\n"
            "    except OSError:\n"
            "        pass".format(canary, str(project)),
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
            "print('still', 'here')",
        ]
        outputs = [vec_env.step((code(snippet),))[0][0] for snippet in hostile]
        assert outputs[0] == "```output\n1 [(1, 'lo')]\n```\n"
        assert "CONNECTED" not in outputs[1] and "Error" in outputs[1]
        assert "WROTE" not in outputs[2]
        assert outputs[4] == "```output\nstill here\n```\n"
        assert actor_pid(ray, actor) == pid, "the actor did not survive its kernel's code"
        with pytest.raises(BlockingIOError):
            host_listener.accept()
        assert not list(Path("/").glob(f"{canary}*")) and not list(project.glob(f"{canary}*"))
    finally:
        vec_env.close()


@pytest.mark.docker
def test_docker_sandbox_backend_by_name_inside_an_actor(ray, host_listener):
    reason = _docker_unavailable_reason()
    require(reason is None, f"docker sandbox unavailable: {reason}")
    from tir_envs.integrations.ray import RayVectorEnv

    vec_env = RayVectorEnv("TIR-Math-v0", 1, sandbox_backend="docker", max_turns=4,
                           max_episode_steps=4,
                           sandbox_kwargs={"pool_size": 1, "require_isolation": True})
    try:
        actor = vec_env.env_pool().actor(0)
        kind = ray.get(actor.__ray_call__.remote(lambda host: type(host.sandbox).__name__))
        assert kind == "DockerSandbox"
        vec_env.reset(seed=0)
        port = host_listener.getsockname()[1]
        outputs = [vec_env.step((code(snippet),))[0][0] for snippet in (
            "x = 2 ** 10\nprint(x)",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "print('CONNECTED')",
            "print(x + 1)",
        )]
        assert outputs[0] == "```output\n1024\n```\n"
        assert "CONNECTED" not in outputs[1] and "Error" in outputs[1]
        assert outputs[2] == "```output\n1025\n```\n"
    finally:
        vec_env.close()


def test_killed_actor_ends_its_episode_as_an_infra_error_and_is_replaced(ray, ray_env):
    ray_env.reset(seed=3)
    ray_env.step((code("a = 1\nprint(a)"),) * 4)
    pool = ray_env.env_pool()
    dead = pool.actor(0)
    os.kill(actor_pid(ray, dead), signal.SIGKILL)

    obs, rewards, terminated, truncated, infos = ray_env.step((code("print(a + 1)"),) * 4)
    for i in (0, 1):  # both envs of the killed actor
        assert truncated[i] and not terminated[i] and rewards[i] == 0.0 and obs[i] == ""
        info = unbatch_info(infos, i)
        assert info["exec"]["status"] == "infra_error" and "died" in info["exec"]["stderr"]
        assert info["turn"] == 2
        trajectory = Trajectory(prompt_ids=[1], group_id=0, problem_id=info["problem_id"],
                                turns=[Turn([2], [0.0], [], rewards[i], info, "stop")],
                                done_reason="truncated")
        assert trajectory.infra_error
    assert obs[2] == obs[3] == "```output\n2\n```\n"  # the other actor's envs go on
    assert [unbatch_info(infos, i)["exec"]["status"] for i in (2, 3)] == ["ok", "ok"]

    obs, *_ = ray_env.step(("",) * 4)  # the lost episodes start again on a new actor
    assert obs[0].startswith(obs[1][:20]) and "Solve" in obs[0]
    assert pool.actor(0) is not dead
    obs, _, _, _, infos = ray_env.step((code("print(5 * 5)"),) * 4)
    assert obs[0] == obs[1] == "```output\n25\n```\n"

    # The same through the pool: a step in flight resolves as an infra error, a reset retries.
    os.kill(actor_pid(ray, pool.actor(2)), signal.SIGKILL)
    result = pool.step(2, code("print(1)")).result(timeout=60)
    assert result[3] and result[4]["exec"]["status"] == "infra_error"
    assert pool.step(3, code("print(1)")).result(timeout=60)[4]["exec"]["status"] == "infra_error"
    os.kill(actor_pid(ray, pool.actor(2)), signal.SIGKILL)
    obs, info = pool.reset(2, {"problem_id": "proc/modpow/1"})
    assert info["problem_id"] == "proc/modpow/1"
    assert pool.step(2, code("print(3)")).result(timeout=60)[0] == "```output\n3\n```\n"


def test_bad_arguments_are_refused(ray_env, tokenizer):
    from tir_envs.integrations.ray import RayVectorEnv

    with pytest.raises(ValueError, match="env_workers"):
        make_vec_env("TIR-Math-v0", 2, tokenizer, ROLLOUT, {"env_workers": "threads"})
    with pytest.raises(ValueError, match="envs_per_actor"):
        RayVectorEnv("TIR-Math-v0", 2, envs_per_actor=0)
    with pytest.raises(ValueError, match="own sandbox"):
        RayVectorEnv("TIR-Math-v0", 2, sandbox=object())
    with pytest.raises(ValueError, match="reset_mask"):
        ray_env.reset(options={"reset_mask": np.zeros(4, dtype=bool)})
    with pytest.raises(ValueError, match="3 actions for 4 envs"):
        ray_env.step(("", "", ""))


def test_training_iterations_through_ray_env_workers(ray, tmp_path):
    """Two iterations: the second collect steps the same actors through the vector env's own
    pool, which a collect must leave open."""
    from algos.cli import app

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--algo", "gtpo", "--model", str(save_tiny(tmp_path / "model")),
        "--run-dir", str(run_dir), "--env-workers", "ray", "--envs-per-actor", "2",
        "--iterations", "2", "--eval-problems", "0", "--no-progress", "--no-warmup",
        "--set", "prompts_per_iteration=2", "--set", "group_size=2",
        "--set", "minibatch_size=2", "--set", "grad_accum_steps=1",
        "--set", "rollout.max_new_tokens=16", "--set", "rollout.max_turns=2",
        "--set", "rollout.max_total_tokens=768",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["env_workers"] == "ray"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["infra_error_rate"] == 0 for r in rows)
    assert (run_dir / "final" / "config.json").is_file()

    refused = CliRunner().invoke(app, ["train", "--model", str(tmp_path / "model"),
                                       "--run-dir", str(tmp_path / "other"),
                                       "--ray-address", "auto"])
    assert refused.exit_code != 0 and "--env-workers ray" in refused.output
