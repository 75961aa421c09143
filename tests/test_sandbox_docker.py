"""Docker-only sandbox tests: container hardening, the pool, faults and cleanup.

The behaviour both backends share (statuses, state, the hostile corpus) lives in
``test_sandbox.py``; this file covers what only a container pool has. Needs a running engine and
the ``tir-sandbox:latest`` image (``scripts/docker_engine.sh``); skips without them, fails in CI.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import require
from tir_envs.sandbox import ExecStatus, SandboxError, make_sandbox
from tir_envs.sandbox import docker as docker_backend

pytestmark = pytest.mark.docker

LIMITS = {"timeout_s": 5.0, "memory_mb": 256, "max_pids": 32, "max_output_bytes": 4096}


@pytest.fixture(scope="module")
def engine():
    reason = docker_backend.unavailable_reason()
    require(reason is None, f"docker backend unavailable: {reason}")
    client = docker_backend._connect()
    yield client
    client.close()


@pytest.fixture(scope="module")
def sandbox(engine):
    with make_sandbox("docker", pool_size=1, **LIMITS) as sb:
        yield sb


def _containers(engine, sandbox=None, pid: int | None = None) -> list:
    """Live containers of one sandbox's pool, or of every sandbox of process ``pid``."""
    if sandbox is not None:
        label = f"{docker_backend.POOL_LABEL}={sandbox.pool_id}"
    else:
        label = f"{docker_backend.OWNER_LABEL}={socket.gethostname()}/{pid}"
    found = engine.containers.list(all=True, filters={"label": label}, ignore_removed=True)
    return [c for c in found if c.status not in ("removing", "exited", "dead")]


def _runner_start(session) -> str:
    """PID 1's start time: the same value means the same container."""
    result = session.run("print(open('/proc/1/stat').read().split()[21])")
    assert result.ok, result
    return result.stdout.strip()


def test_containers_are_hardened(sandbox, engine):
    containers = _containers(engine, sandbox)
    assert containers
    for container in containers:
        host = container.attrs["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        expected_mb = LIMITS["memory_mb"] + docker_backend.RUNNER_MEMORY_MB
        assert host["Memory"] == expected_mb << 20
        assert host["MemorySwap"] == host["Memory"]
        assert host["PidsLimit"] == LIMITS["max_pids"] + docker_backend.RUNNER_PIDS
        assert "/tmp" in host["Tmpfs"]
        assert not container.attrs["Config"]["User"].startswith("0")
        assert container.labels[docker_backend.LABEL] == "1"


def test_isolation_layers_are_measured_and_active(sandbox):
    assert sandbox.isolation.layers["network_none"]
    assert sandbox.isolation.missing == []
    with make_sandbox("docker", pool_size=0, require_isolation=True, **LIMITS) as strict:
        assert strict.run("print(1)").stdout == "1\n"


def test_identity_inside(sandbox):
    result = sandbox.run(
        "import os; print(os.getuid(), os.getcwd(), sorted(os.listdir('/sys/class/net')))"
    )
    assert result.ok, result
    uid, cwd, interfaces = result.stdout.split(maxsplit=2)
    assert uid != "0" and cwd == "/tmp" and interfaces.strip() == "['lo']"


def test_loopback_is_closed_too(sandbox):
    # network_mode=none keeps a working lo; the kernel's seccomp filter closes it.
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()"
    result = sandbox.run(code)
    assert result.status is ExecStatus.ERROR
    assert "Operation not permitted" in result.stderr
    assert sandbox.run("import socket; a, b = socket.socketpair(); print('unix ok')").ok


def test_next_session_reuses_a_wiped_container(sandbox):
    with sandbox.session() as first:
        start = _runner_start(first)
        setup = textwrap.dedent(
            """
            import ctypes, os
            open('/tmp/secret', 'w').write('from session one')
            os.makedirs('/tmp/locked/deeper'); os.chmod('/tmp/locked', 0)
            open('/dev/shm/leak', 'w').write('x')
            libc = ctypes.CDLL(None)
            print(libc.shmget(0x5EC, 4096, 0o1666) >= 0)
            """
        )
        assert first.run(setup).stdout == "True\n"
    with sandbox.session() as second:
        assert _runner_start(second) == start, "the pool should have handed back the same container"
        check = textwrap.dedent(
            """
            import os
            print(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')))
            print(open('/proc/sysvipc/shm').read().count('\\n') - 1)
            """
        )
        result = second.run(check)
        assert result.stdout == "[] []\n0\n", result


def test_strays_die_with_the_cell_and_sessions_leave_no_process(sandbox):
    code = textwrap.dedent(
        """
        import os, subprocess
        subprocess.Popen(['sleep', '300'], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                import time; time.sleep(300)
            os._exit(0)
        print('spawned')
        """
    )
    with sandbox.session() as session:
        assert session.run(code).stdout == "spawned\n"
        ps = "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
        pids = eval(session.run(ps).stdout)
        assert len(pids) == 2, f"expected only the runner (PID 1) and the kernel: {pids}"


def test_subprocess_flood_is_cut(sandbox):
    # A child process bypasses the kernel's capped sys.stdout; the runner counts the pipe itself.
    result = sandbox.run("import subprocess; subprocess.run(['yes'])", timeout=20)
    assert result.status is ExecStatus.OUTPUT_LIMIT
    assert result.duration_s < 10
    assert len(result.stdout.encode()) <= LIMITS["max_output_bytes"]
    assert sandbox.run("print('after')").stdout == "after\n"


def test_state_is_lost_after_a_timeout_and_the_result_says_so(sandbox):
    with sandbox.session() as session:
        session.run("x = 1")
        timed_out = session.run("while True: pass", timeout=0.5)
        assert timed_out.status is ExecStatus.TIMEOUT
        assert "TimeoutError" in timed_out.stderr and "restarts" in timed_out.stderr
        result = session.run("print('x' in globals())")
        assert (result.stdout, result.stderr) == ("False\n", "")


def test_container_killed_from_outside_is_replaced(engine):
    with make_sandbox("docker", pool_size=0, **LIMITS) as sb, sb.session() as session:
        session.run("x = 1")
        (container,) = _containers(engine, sb)
        container.kill()
        broken = session.run("print(x)")
        assert broken.status is ExecStatus.INFRA_ERROR, broken
        assert "restarts" in broken.stderr
        after = session.run("print(6 * 7)")
        assert (after.stdout, after.stderr) == ("42\n", ""), after
        assert sb.run("print('pool ok')").stdout == "pool ok\n"


def test_hung_container_is_a_timeout_and_gets_replaced(engine, monkeypatch):
    monkeypatch.setattr(docker_backend, "GRACE_S", 1.0)
    with make_sandbox("docker", pool_size=0, **LIMITS) as sb, sb.session() as session:
        (container,) = _containers(engine, sb)
        container.pause()  # the runner cannot answer at all, not even to kill the kernel
        start = time.monotonic()
        result = session.run("print(1)", timeout=1.0)
        assert result.status is ExecStatus.TIMEOUT
        assert time.monotonic() - start < 10
        assert session.run("print(2)").stdout == "2\n"
        assert container.id not in {c.id for c in _containers(engine, sb)}


def test_concurrent_sessions_from_threads(engine):
    with make_sandbox("docker", pool_size=2, **LIMITS) as sb:
        results: dict[int, list] = {}

        def episode(i: int) -> None:
            with sb.session() as session:
                session.run(f"acc = {i}")
                results[i] = [session.run("acc += 1; print(acc)").stdout for _ in range(5)]

        threads = [threading.Thread(target=episode, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert results == {i: [f"{i + k}\n" for k in range(1, 6)] for i in range(4)}
        assert len(_containers(engine, sb)) <= 4


def test_close_from_another_thread_stops_a_running_cell(sandbox):
    session = sandbox.session()
    results = []
    runner = threading.Thread(target=lambda: results.append(session.run("while True: pass")))
    runner.start()
    time.sleep(0.5)
    start = time.monotonic()
    session.close()
    runner.join(timeout=30)
    assert results[0].status is ExecStatus.INFRA_ERROR
    assert time.monotonic() - start < LIMITS["timeout_s"]
    assert sandbox.run("print('still fine')").stdout == "still fine\n"


def _child_episode(sb, queue) -> None:
    with sb.session() as session:
        queue.put(session.run("print(6 * 7)").stdout)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_processes_get_their_own_pool(sandbox, engine, method):
    """AsyncVectorEnv workers: a forked child must not touch the parent's containers, a spawned
    one unpickles the sandbox as its configuration."""
    import multiprocessing

    with sandbox.session() as session:
        session.run("x = 5")
        before = {c.id for c in _containers(engine, sandbox)}
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=_child_episode, args=(sandbox, queue))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0
        assert queue.get(timeout=5) == "42\n"
        assert session.run("print(x)").stdout == "5\n"
        assert before <= {c.id for c in _containers(engine, sandbox)}


def test_close_removes_every_container(engine):
    sb = make_sandbox("docker", pool_size=2, **LIMITS)
    session = sb.session()
    session.run("print(1)")
    assert _containers(engine, sb)
    sb.close()
    assert _containers(engine, sb) == []
    with pytest.raises(SandboxError):
        sb.session()
    with pytest.raises(SandboxError):
        session.run("print(1)")


def test_a_crashed_owner_leaves_nothing_behind(engine):
    script = textwrap.dedent(
        """
        import os, sys
        from tir_envs.sandbox import make_sandbox
        sb = make_sandbox("docker", pool_size=2)
        sb.session().run("import subprocess; subprocess.Popen(['sleep', '300'])")
        sb._refiller.join()  # a container killed between create and attach is swept, not stopped
        print(os.getpid(), flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=os.getcwd()
    )
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _containers(engine, pid=pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _containers(engine, pid=pid) == []


def test_leftovers_of_dead_owners_are_swept(engine):
    dead_pid = 2**22 + 12345  # above pid_max's default: no live process has it
    container = engine.containers.create(
        docker_backend.DEFAULT_IMAGE,
        labels={
            docker_backend.LABEL: "1",
            docker_backend.OWNER_LABEL: f"{socket.gethostname()}/{dead_pid}",
        },
        network_mode="none",
    )
    try:
        assert docker_backend.remove_leftovers(engine) >= 1
        assert _containers(engine, pid=dead_pid) == []
    finally:
        docker_backend._force_remove(container)


def test_missing_image_is_a_clear_error(engine):
    with pytest.raises(SandboxError, match="build.sh"):
        make_sandbox("docker", image="tir-sandbox:does-not-exist")


def test_warm_exec_is_fast(sandbox):
    # A smoke check of the warm path, far from the 100 ms target; benchmarks/ measures properly.
    with sandbox.session() as session:
        session.run("import numpy, sympy")
        latencies = []
        for _ in range(50):
            start = time.perf_counter()
            assert session.run("print(sum(range(10)))").ok
            latencies.append(time.perf_counter() - start)
    assert statistics.median(latencies) < 0.1


def test_an_image_built_from_other_sources_is_refused(engine):
    """An image whose sources label differs from this checkout's runner and cell module (an
    image built before them) is refused with the command that rebuilds it, not run."""
    import io

    stale = "tir-sandbox:stale-sources-test"
    dockerfile = f"FROM {docker_backend.DEFAULT_IMAGE}\nLABEL {docker_backend.SOURCES_LABEL}=old\n"
    engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=stale, rm=True)
    try:
        reason = docker_backend.unavailable_reason(stale)
        assert reason is not None and "other sources" in reason and "build.sh" in reason
        with pytest.raises(SandboxError, match="other sources"):
            make_sandbox("docker", image=stale, pool_size=1, **LIMITS)
    finally:
        engine.images.remove(stale, force=True)
    assert docker_backend.image_problem(engine, docker_backend.DEFAULT_IMAGE) is None
