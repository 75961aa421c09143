"""The sandbox contract, run against every backend, plus the local backend's own guarantees.

Part 1 (``backend`` fixture over local and docker): statuses, state across runs, isolation between
sessions, output handling, threads, and a hostile-code corpus. Every hostile snippet must be
contained, reported with the right status, leave nothing on the host, and leave its session and
its sandbox usable. The docker backend skips with a reason when no engine/image is available
(and fails in CI).

Part 2 (local only): which isolation layers are active, timeouts killing everything, no leftover
processes, zygote restart, fork/spawn safety (AsyncVectorEnv workers), pickling.

Limits are small so a broken containment fails fast instead of hanging CI; every test also runs
under pytest-timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require
from tir_envs.sandbox import ExecStatus, Limits, SandboxError, make_sandbox
from tir_envs.sandbox import local as local_backend

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"timeout_s": 5.0, "memory_mb": 256, "cpu_s": 30, "max_output_bytes": 4096,
          "file_size_mb": 4, "max_open_files": 64, "max_pids": 32}
HOSTILE_TIMEOUT_S = 1.5
"""Per-run wall clock for hostile snippets: long enough to misbehave, short enough for CI."""
ENV_CANARY = "TIR_SANDBOX_TEST_SECRET"

OK, ERROR, TIMEOUT = ExecStatus.OK, ExecStatus.ERROR, ExecStatus.TIMEOUT
MEMORY, OUTPUT_LIMIT = ExecStatus.MEMORY, ExecStatus.OUTPUT_LIMIT

pytestmark = pytest.mark.timeout(60)


def _docker_unavailable_reason() -> str | None:
    try:
        from tir_envs.sandbox import docker as docker_backend
    except ImportError as exc:
        return f"docker backend not importable: {exc}"
    return docker_backend.unavailable_reason()


@pytest.fixture(scope="module", params=["local", "docker"])
def backend(request) -> str:
    if request.param == "docker":
        reason = _docker_unavailable_reason()
        require(reason is None, f"docker sandbox unavailable: {reason}")
    return request.param


@pytest.fixture(scope="module")
def sandbox(backend):
    os.environ[ENV_CANARY] = "hunter2"  # present in our env: must not reach the kernel
    try:
        with make_sandbox(backend, **LIMITS) as sb:
            yield sb
    finally:
        os.environ.pop(ENV_CANARY, None)


@pytest.fixture
def session(sandbox):
    with sandbox.session() as s:
        yield s


def run_ok(session, code: str, **kwargs) -> str:
    result = session.run(textwrap.dedent(code), **kwargs)
    assert result.status is OK, result
    return result.stdout


# ============================================================================================
# Part 1: the contract
# ============================================================================================


def test_trivial_snippet(session):
    result = session.run("print(sum(range(10)))")
    assert result.status is OK and result.stdout == "45\n" and result.stderr == ""
    assert result.ok and 0 < result.duration_s < 5


def test_globals_persist_across_runs(session):
    run_ok(session, "x = 41\ndef inc(v):\n    return v + 1")
    assert run_ok(session, "print(inc(x))") == "42\n"
    assert run_ok(session, "import numpy as np\nxs = np.arange(4)") == ""
    assert run_ok(session, "print(int(xs.sum()), type(xs).__module__)") == "6 numpy\n"


def test_preloaded_math_modules_work(session):
    out = run_ok(session, """
        import sympy, numpy as np, math, fractions, itertools
        x = sympy.Symbol("x")
        print(sympy.solve(x**2 - 4, x), np.linalg.det(np.eye(2)), math.comb(5, 2),
              fractions.Fraction(1, 3) * 3, len(list(itertools.permutations(range(3)))))
    """)
    assert out == "[-2, 2] 1.0 10 1 6\n"


def test_cells_compile_like_a_plain_script(session):
    out = run_ok(session, """
        def f(x: int) -> int:
            return x
        print(f.__annotations__, __name__)
    """)  # no __future__ flags leak in from the sandbox's own code
    assert out == "{'x': <class 'int'>, 'return': <class 'int'>} __main__\n"


def test_sessions_share_neither_state_nor_files(sandbox):
    with sandbox.session() as first, sandbox.session() as second:
        run_ok(first, "secret = 7\nopen('/tmp/note.txt', 'w').write('first')")
        result = second.run("print(secret)")
        assert result.status is ERROR and "NameError" in result.stderr
        result = second.run("print(open('/tmp/note.txt').read())")
        assert result.status is ERROR and "FileNotFoundError" in result.stderr
        assert run_ok(first, "print(secret, open('/tmp/note.txt').read())") == "7 first\n"


def test_error_reports_traceback_and_keeps_state(session):
    run_ok(session, "kept = 'yes'")
    result = session.run("def f():\n    return 1 / 0\nf()")
    assert result.status is ERROR
    assert "ZeroDivisionError" in result.stderr and "Traceback" in result.stderr
    assert "return 1 / 0" in result.stderr  # the cell's own source lines are shown
    assert run_ok(session, "print(kept)") == "yes\n"


def test_traceback_shows_only_the_cells_frames(session):
    result = session.run("def f():\n    return 1 / 0\nf()")
    frames = [line for line in result.stderr.splitlines() if line.lstrip().startswith('File "')]
    assert len(frames) == 2 and all('File "<cell ' in frame for frame in frames), result.stderr


def test_errors_are_reported_even_if_the_cell_replaced_its_streams(session):
    result = session.run("import io, sys\nprint('kept', end='')\n"
                         "sys.stdout = sys.stderr = io.StringIO()\nraise ValueError('seen')")
    assert result.status is ERROR and result.stdout == "kept", result
    assert "ValueError: seen" in result.stderr


def test_syntax_error_is_an_error(session):
    result = session.run("def broken(:\n  pass")
    assert result.status is ERROR and "SyntaxError" in result.stderr


def test_stdout_survives_warnings_on_stderr(session):
    result = session.run("import warnings\nwarnings.warn('careful')\nprint('the answer')")
    assert result.status is OK
    assert result.stdout == "the answer\n" and "UserWarning: careful" in result.stderr


def test_output_printed_before_an_error_is_kept(session):
    result = session.run("print('partial')\nraise ValueError('bad')")
    assert result.status is ERROR and result.stdout == "partial\n"
    assert "ValueError: bad" in result.stderr


@pytest.mark.parametrize("code, status", [
    ("raise SystemExit", OK), ("import sys; sys.exit(0)", OK), ("exit()", OK),
    ("import sys; sys.exit(3)", ERROR), ("raise KeyboardInterrupt", ERROR),
])
def test_exit_and_interrupt_do_not_end_the_session(session, code, status):
    run_ok(session, "alive = True")
    assert session.run(code).status is status
    assert run_ok(session, "print(alive)") == "True\n"


def test_timeout_argument_is_honoured_and_session_recovers(session):
    started = time.monotonic()
    result = session.run("import time\ntime.sleep(30)", timeout=0.5)
    assert result.status is TIMEOUT
    assert time.monotonic() - started < 5
    assert run_ok(session, "print('next')") == "next\n"


def test_default_timeout_comes_from_the_limits(backend):
    with make_sandbox(backend, **{**LIMITS, "timeout_s": 1.0}) as sb, sb.session() as s:
        started = time.monotonic()
        assert s.run("while True: pass").status is TIMEOUT
        assert 0.9 < time.monotonic() - started < 5


def test_cpu_limit_stops_a_kernel_the_wall_clock_would_not(backend):
    """The CPU budget ends in SIGKILL: ignoring SIGXCPU does not buy the code more time."""
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    with make_sandbox(backend, **{**LIMITS, "cpu_s": 1}) as sb, sb.session() as s:
        result = s.run(code, timeout=30)
        assert result.status is TIMEOUT and "CPU time limit" in result.stderr, result
        assert run_ok(s, "print('again')") == "again\n"


def test_a_file_past_its_size_limit_is_an_error_in_the_cell(session):
    run_ok(session, "kept = 1")
    big = (LIMITS["file_size_mb"] + 1) << 20
    result = session.run(f"open('/tmp/big', 'wb').write(b'x' * {big})")
    assert result.status is ERROR and "File too large" in result.stderr, result
    assert run_ok(session, "print(kept)") == "1\n"  # the kernel lived on


def test_multiprocessing_pickles_functions_the_cells_define(session):
    out = run_ok(session, """
        import multiprocessing
        def square(x):
            return x * x
        with multiprocessing.get_context('fork').Pool(2) as pool:
            print(pool.map(square, range(5)))
    """)
    assert out == "[0, 1, 4, 9, 16]\n"


def test_a_forked_child_falling_off_a_failing_cell_exits_1(session):
    out = run_ok(session, """
        import os
        pid = os.fork()
        if pid == 0:
            raise ValueError('in the child')
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """)
    assert out == "1\n"


def test_memory_error_is_memory(session):
    result = session.run("x = bytearray(8 * 1024 ** 3)")
    assert result.status is MEMORY
    assert run_ok(session, "print('fine')") == "fine\n"


def test_output_is_truncated_to_the_limit(session):
    result = session.run("print('x' * 100_000)")
    assert result.status is OUTPUT_LIMIT
    assert 0 < len(result.stdout.encode()) <= LIMITS["max_output_bytes"]
    assert run_ok(session, "print('short')") == "short\n"


def test_streams_of_an_earlier_cell_write_nowhere(session):
    """A stream kept, or flushed at garbage collection, after its cell neither leaks into nor
    stops a later cell."""
    assert session.run("import sys\nkept = sys.stdout\nprint('x' * 100_000)").status is OUTPUT_LIMIT
    result = session.run("kept.write('stale\\n')\nkept.flush()\nprint('fresh')")
    assert (result.status, result.stdout, result.stderr) == (OK, "fresh\n", ""), result


def test_a_cell_that_closes_its_output_fds_breaks_only_itself(session):
    session.run("import os\nos.close(1)\nos.close(2)")
    assert run_ok(session, "import os\nos.write(1, b'raw\\n')") == "raw\n"


def test_a_cell_that_closes_stdin_breaks_only_itself(session):
    session.run("import sys\nsys.stdin.close()")
    result = session.run("input()")
    assert result.status is ERROR and "EOFError" in result.stderr, result  # not a closed file


def test_stderr_flood_is_truncated_too(session):
    result = session.run("import sys\nfor _ in range(10**6): sys.stderr.write('e' * 100)")
    assert result.status is OUTPUT_LIMIT
    assert len(result.stderr.encode()) <= LIMITS["max_output_bytes"] + 300  # + a backend note


def test_binary_output_decodes_safely(session):
    result = session.run("import sys\nsys.stdout.buffer.write(bytes(range(256)))")
    assert result.status is OK
    assert "\ufffd" in result.stdout and "ABC" in result.stdout
    result.stdout.encode("utf-8")  # always valid text


def test_lone_surrogates_become_replacement_characters(session):
    result = session.run("print('a\\ud800b')")
    assert result.status is OK
    assert result.stdout.startswith("a\ufffd") and result.stdout.endswith("b\n")
    result.stdout.encode("utf-8")


def test_unicode_roundtrip(session):
    assert run_ok(session, "print('π ≈ 3.14159, ∑ → ∞, 数学')") == "π ≈ 3.14159, ∑ → ∞, 数学\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_written_text_comes_back_exactly(session, text):
    result = session.run(f"import sys\nsys.stdout.write({text!r})")
    assert result.status is OK
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        assert result.stdout == text
    result.stdout.encode("utf-8")


def test_nul_byte_in_code_is_an_error_not_a_crash(session):
    result = session.run("print(1)\x00")
    assert result.status is ERROR
    assert run_ok(session, "print(2)") == "2\n"


def test_non_string_code_is_rejected(session):
    with pytest.raises(TypeError):
        session.run(b"print(1)")


def test_large_code_runs(session):
    code = "total = 0\n" + "total += 1\n" * 50_000 + "print(total)"
    assert run_ok(session, code) == "50000\n"


def test_sandbox_run_uses_a_throwaway_session(sandbox):
    assert sandbox.run("print(6 * 7)").stdout == "42\n"
    assert sandbox.run("print('x' in globals())").stdout == "False\n"


def test_closed_session_refuses_to_run(sandbox):
    s = sandbox.session()
    s.close()
    s.close()  # idempotent
    with pytest.raises(SandboxError):
        s.run("print(1)")


def test_sessions_are_thread_safe(sandbox):
    errors: list[str] = []

    def worker(session, tag: int) -> None:
        for i in range(25):
            result = session.run(f"print({tag} * 1000 + {i})")
            if result.stdout != f"{tag * 1000 + i}\n":
                errors.append(f"{tag}/{i}: {result}")

    sessions = [sandbox.session() for _ in range(3)]
    try:
        threads = [threading.Thread(target=worker, args=(sessions[t % 3], t)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for s in sessions:
            s.close()
    assert not errors


def test_isolation_is_reported(sandbox):
    layers = sandbox.isolation.layers
    assert layers and all(isinstance(active, bool) for active in layers.values())
    assert set(sandbox.isolation.missing) == {name for name, on in layers.items() if not on}


# --------------------------------------------------------------------------------------------
# The hostile corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    name: str
    code: str
    statuses: tuple[ExecStatus, ...]
    forbidden: tuple[str, ...] = ()
    """Strings that must not appear in stdout (leaked secrets, proofs of escape)."""


def _home_file() -> str:
    """A real file in the host user's home directory, for the code to try to read."""
    home = Path.home()
    for candidate in sorted(home.iterdir()) if home.is_dir() else []:
        if candidate.is_file():
            return str(candidate)
    return str(home / ".bashrc")


HOSTILE = [
    Hostile("fork_bomb", "import os\nwhile True:\n    os.fork()",  # every copy may print a traceback
            (ERROR, TIMEOUT, MEMORY, OUTPUT_LIMIT)),
    Hostile("fork_bomb_swallowing_errors",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            (TIMEOUT, ERROR, MEMORY)),
    Hostile("memory_bomb_at_once", "x = bytearray(64 * 1024 ** 3)", (MEMORY,)),
    Hostile("memory_bomb_growing", "chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)",
            (MEMORY,)),
    Hostile("memory_bomb_numpy", "import numpy as np\na = np.ones((10**6, 10**4))", (MEMORY,)),
    Hostile("busy_loop_ignoring_signals", """
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM,
                    signal.SIGUSR1, signal.SIGXCPU):
            signal.signal(sig, signal.SIG_IGN)
        while True:
            pass
    """, (TIMEOUT,)),
    Hostile("busy_children_ignoring_signals", """
        import os, signal
        for _ in range(4):
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    pass
        while True:
            pass
    """, (TIMEOUT,)),
    Hostile("sleep_forever", "import time\ntime.sleep(10**6)", (TIMEOUT,)),
    Hostile("disk_fill_one_file", """
        with open('/tmp/{canary}', 'wb') as f:
            while True:
                f.write(b'\\0' * 2**20)
    """, (ERROR, MEMORY)),
    Hostile("disk_fill_many_files", """
        i = 0
        while True:
            with open(f'/tmp/{canary}-{{i}}', 'wb') as f:
                f.write(b'\\0' * 2**20)
            i += 1
    """, (ERROR, MEMORY)),
    Hostile("endless_print", "while True:\n    print('spam ' * 100)", (OUTPUT_LIMIT,)),
    Hostile("endless_raw_fd_writes", "import os\nwhile True:\n    os.write(1, b'x' * 65536)",
            (OUTPUT_LIMIT, TIMEOUT)),
    Hostile("endless_output_from_a_subprocess",
            "import subprocess\nsubprocess.run(['yes'])", (OUTPUT_LIMIT, TIMEOUT)),
    Hostile("network_outside", """
        import socket
        socket.create_connection(('1.1.1.1', 53), timeout=1)
        print('CONNECTED')
    """, (ERROR,), ("CONNECTED",)),
    Hostile("network_dns", "import socket\nprint(socket.getaddrinfo('example.com', 80))",
            (ERROR,), ("example",)),
    Hostile("network_loopback_to_host", """
        import socket
        socket.create_connection(('127.0.0.1', {port}), timeout=1)
        print('CONNECTED')
    """, (ERROR,), ("CONNECTED",)),
    Hostile("read_etc_shadow", "print(open('/etc/shadow').read())", (ERROR,), ("root:",)),
    Hostile("read_project_tree", "print(open({test_file!r}).read())", (ERROR,),
            ("HOSTILE_MARKER_IN_THIS_FILE",)),
    Hostile("list_project_tree", "import os\nprint(os.listdir({project!r}))", (OK, ERROR),
            ("pyproject.toml", "tir_envs", "tests")),
    Hostile("read_home_file", "print(open({home_file!r}).read()[:100])", (ERROR,)),
    Hostile("read_env_vars", """
        import os
        print(dict(os.environ))
        for pid in os.listdir('/proc') if os.path.isdir('/proc') else []:
            try:
                print(open(f'/proc/{{pid}}/environ', 'rb').read())
            except OSError:
                pass
    """, (OK,), ("hunter2", ENV_CANARY)),
    Hostile("write_outside_tmp", """
        import os
        for target in ('/{canary}', '/etc/{canary}', '/usr/{canary}', {project!r} + '/{canary}',
                       {home!r} + '/{canary}', '/var/tmp/{canary}', '/dev/shm/../{canary}'):
            try:
                with open(target, 'w') as f:
                    f.write('owned')
                print('WROTE', target)
            except OSError:
                pass
    """, (OK,), ("WROTE",)),
    Hostile("spawn_shell", """
        import os, subprocess
        print(subprocess.run(['sh', '-c', 'echo shell-ran; cat /etc/shadow; ls /root/.ssh'],
                             capture_output=True, text=True).stdout)
        os.system('echo system-ran > /tmp/{canary}')
    """, (OK,), ("root:",)),
    Hostile("kill_the_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
            (OK, ERROR, TIMEOUT)),
    Hostile("kill_pid_1", "import os, signal\nos.kill(1, signal.SIGKILL)", (OK, ERROR, TIMEOUT)),
    Hostile("kill_everything", "import os, signal\nos.kill(-1, signal.SIGKILL)",
            (OK, ERROR, TIMEOUT)),
    Hostile("kill_the_zygote_by_pid", "import os, signal\nos.kill({zygote_pid}, signal.SIGKILL)",
            (OK, ERROR)),
    Hostile("thread_storm", """
        import threading, time
        for _ in range(10_000):
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    """, (ERROR, MEMORY)),
    Hostile("segfault", "import ctypes\nctypes.string_at(0)", (ERROR,)),
    Hostile("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", (ERROR,)),
    Hostile("deep_recursion_past_the_c_stack", """
        import sys
        sys.setrecursionlimit(10**8)
        def f(n):
            return f(n + 1)
        f(0)
    """, (ERROR, MEMORY, TIMEOUT)),
    Hostile("binary_garbage_output",
            "import os, sys\nsys.stdout.buffer.write(os.urandom(2000) + b'\\xff\\xfe\\x00')",
            (OK,)),
    Hostile("stdin_read", "print(input('? '))", (ERROR,)),
    Hostile("leaked_daemon", """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(10**6)
            os._exit(0)
        print('parent done')
    """, (OK,)),
    Hostile("hard_exit", "import os\nos._exit(3)", (ERROR,)),
    Hostile("close_every_descriptor", "import os\nos.closerange(0, 4096)\nprint('blind')",
            (ERROR, OK, TIMEOUT)),
    Hostile("new_user_namespace_to_regain_root", """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x10000000)
        print(open('/etc/shadow').read())
    """, (ERROR,), ("root:",)),
]
HOST_WRITE_SPOTS = [Path("/"), Path("/etc"), Path("/usr"), Path("/tmp"), Path("/var/tmp"),
                    Path("/dev/shm"), PROJECT_ROOT, Path.home()]


@pytest.mark.timeout(45)
@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_code_is_contained(sandbox, host_listener, case):
    # HOSTILE_MARKER_IN_THIS_FILE: read_project_tree must not be able to print this line.
    canary = f"tir-canary-{uuid.uuid4().hex[:12]}"
    code = textwrap.dedent(case.code).format(
        canary=canary, port=host_listener.getsockname()[1], test_file=__file__,
        project=str(PROJECT_ROOT), home=str(Path.home()), home_file=_home_file(),
        zygote_pid=getattr(sandbox, "zygote_pid", None) or 999_999)
    with sandbox.session() as s:
        run_ok(s, "before = 'set'")
        result = s.run(code, timeout=HOSTILE_TIMEOUT_S)
        assert result.status in case.statuses, result
        for secret in case.forbidden:
            assert secret not in result.stdout, result
        result.stdout.encode("utf-8"), result.stderr.encode("utf-8")
        after = s.run("print('still', 'here')")
        assert after.status is OK and after.stdout == "still here\n", after
    with sandbox.session() as fresh:
        assert run_ok(fresh, "print(1 + 1)") == "2\n"
    with pytest.raises(BlockingIOError):
        host_listener.accept()
    for spot in HOST_WRITE_SPOTS:
        assert not list(spot.glob(f"{canary}*")), f"{case.name} wrote into {spot}"


# ============================================================================================
# Part 2: the local backend
# ============================================================================================


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def local_sandbox():
    with make_sandbox("local", **LIMITS) as sb:
        yield sb


def _namespaces_expected() -> bool:
    try:
        with open("/proc/sys/user/max_user_namespaces") as fh:
            return int(fh.read()) > 0
    except OSError:
        return False


def test_local_isolation_layers(local_sandbox):
    layers = local_sandbox.isolation.layers
    assert set(layers) == set(local_backend.REPORTED_LAYERS)
    require(os.geteuid() == 0 and _namespaces_expected(),
            "full isolation is only expected as root with user namespaces enabled")
    assert local_sandbox.isolation.missing == [], local_sandbox.isolation_problems


def test_kernel_sees_only_its_own_world(local_sandbox):
    require(not local_sandbox.isolation.missing, "needs every isolation layer")
    with local_sandbox.session() as s:
        out = run_ok(s, """
            import os, socket
            print(os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))
            print(sorted(os.listdir('/')))
            print(socket.if_nameindex())
            print(os.getuid() != 0, os.getcwd(), os.environ['HOME'])
        """)
    pid_line, root_line, net_line, user_line = out.splitlines()
    assert pid_line == "1 ['1']"
    assert "home" not in root_line and "var" not in root_line and "sys" not in root_line
    assert net_line == "[(1, 'lo')]"
    assert user_line == "True /tmp /tmp"


def test_missing_layers_are_logged_once_and_can_be_required(monkeypatch, caplog):
    class NoCgroups:
        def __init__(self, *args):
            self.controllers, self.problems = {}, {"pids": "stubbed", "memory": "stubbed"}

        def create(self):
            raise AssertionError("no controllers")

        def close(self):
            pass

    monkeypatch.setattr(local_backend, "KernelCgroups", NoCgroups)
    monkeypatch.setattr(local_backend, "_missing_logged", set())
    with pytest.raises(SandboxError, match="cgroup_pids"):
        make_sandbox("local", require_isolation=True, prestart=0, **LIMITS)
    with caplog.at_level("WARNING", logger=local_backend.__name__):
        for _ in range(2):
            with make_sandbox("local", prestart=0, **LIMITS) as sb:
                assert {"cgroup_pids", "cgroup_memory"} <= set(sb.isolation.missing)
                assert sb.run("print('works')").stdout == "works\n"
    warned = [r for r in caplog.records if "cgroup_pids" in r.getMessage()]
    assert len(warned) == 1


def test_require_isolation_passes_when_everything_is_active():
    require(os.geteuid() == 0 and _namespaces_expected(), "needs root and user namespaces")
    with make_sandbox("local", require_isolation=True, prestart=0, **LIMITS) as sb:
        assert sb.run("print('isolated')").stdout == "isolated\n"


def test_timeout_kills_every_process_the_code_started(local_sandbox):
    with local_sandbox.session() as s:
        run_ok(s, "x = 1")
        kernel = psutil.Process(s.kernel_pid)
        family = [kernel.parent(), kernel]
        code = textwrap.dedent("""
            import os, signal
            print('started')
            for _ in range(3):
                if os.fork() == 0:
                    os.setsid()
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    while True:
                        pass
            while True:
                pass
        """)
        results = []
        runner = threading.Thread(target=lambda: results.append(s.run(code, timeout=2)))
        runner.start()
        assert _wait_until(lambda: len(kernel.children()) == 3)
        family += kernel.children()
        runner.join()
        result = results[0]
        assert result.status is TIMEOUT
        assert result.stdout == "started\n"  # output up to the kill is kept
        assert "restarts" in result.stderr
        assert _wait_until(lambda: not any(p.is_running() for p in family))
        lost = s.run("print(x)")
        assert lost.status is ERROR and "NameError" in lost.stderr  # a fresh kernel


def test_cell_processes_do_not_outlive_the_cell(local_sandbox):
    with local_sandbox.session() as s:
        run_ok(s, """
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(10**6)
                os._exit(0)
        """)
        out = run_ok(s, "import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))")
        assert out == "['1']\n"


def test_no_leftover_processes_after_close():
    sb = make_sandbox("local", **LIMITS)
    zygote = sb.zygote_pid
    sessions = [sb.session() for _ in range(3)]
    for s in sessions:
        run_ok(s, "import threading, time\n"
                  "threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()")
    sessions[0].close()
    assert len(_descendants(zygote)) >= 2
    cgroup_dirs = [c.base for c in sb._cgroups.controllers.values()]
    sb.close()
    assert _wait_until(lambda: not psutil.pid_exists(zygote))
    assert not any(Path(d).exists() for d in cgroup_dirs)
    with pytest.raises(SandboxError):
        sb.session()


def test_zygote_restarts_and_live_sessions_survive(local_sandbox):
    with local_sandbox.session() as old:
        run_ok(old, "v = 'kept'")
        first = local_sandbox.zygote_pid
        os.kill(first, signal.SIGKILL)
        assert _wait_until(lambda: local_sandbox.zygote_pid != first)  # seen dead (and reaped)
        assert run_ok(old, "print(v)") == "kept\n"  # kernels do not depend on the zygote
        sessions = [local_sandbox.session() for _ in range(3)]  # past the prestarted kernel
        for s in sessions:
            assert run_ok(s, "print('reborn')") == "reborn\n"
            s.close()
        assert _wait_until(lambda: local_sandbox.zygote_pid not in (None, first), timeout=30)


def test_a_kernel_that_cannot_start_is_an_infra_error(monkeypatch):
    with make_sandbox("local", prestart=0, **LIMITS) as sb:
        def broken(self):
            raise SandboxError("no kernels today")

        monkeypatch.setattr(local_backend.LocalSandbox, "_try_start_kernel", broken)
        s = sb.session()  # does not raise: the env's reset must survive a broken sandbox
        result = s.run("print(1)")
        assert result.status is ExecStatus.INFRA_ERROR and "no kernels today" in result.stderr
        monkeypatch.undo()
        assert run_ok(s, "print(2)") == "2\n"
        s.close()


def test_a_hung_zygote_is_replaced(monkeypatch):
    monkeypatch.setattr(local_backend, "KERNEL_START_TIMEOUT_S", 1.0)
    monkeypatch.setattr(local_backend, "KILL_WAIT_S", 0.5)
    with make_sandbox("local", prestart=0, **LIMITS) as sb:
        hung = sb.zygote_pid
        os.kill(hung, signal.SIGSTOP)
        with sb.session() as s:  # its kernel cannot start in time; the run starts another
            assert run_ok(s, "print('hello')") == "hello\n"
        assert _wait_until(lambda: not psutil.pid_exists(hung))
        assert sb.zygote_pid not in (None, hung)


def test_oom_kill_is_reported_as_memory():
    """Memory RLIMIT_AS cannot see (unmapped memfd pages) still hits the kernel's cgroup."""
    small = {**LIMITS, "memory_mb": 128}
    with make_sandbox("local", prestart=0, **small) as sb, sb.session() as s:
        require(sb.isolation.layers["cgroup_memory"], "needs the memory cgroup")
        run_ok(s, "kept = 1")
        result = s.run(textwrap.dedent("""
            import os
            chunk = b'x' * ((4 << 20) - 1)  # just under RLIMIT_FSIZE
            held = []
            while True:
                fd = os.memfd_create('hoard')
                os.write(fd, chunk)
                held.append(fd)
        """), timeout=10)
        assert result.status is MEMORY, result
        assert "memory limit" in result.stderr
        lost = s.run("print(kept)")
        assert lost.status is ERROR and "NameError" in lost.stderr


def test_cgroup_v2_groups_are_made_under_our_own(tmp_path, monkeypatch):
    """The v2 path, on a fake hierarchy (this CI machine mounts pids/memory as v1)."""
    from tir_envs.sandbox import _cgroup

    ours = tmp_path / "user.slice" / "me"
    ours.mkdir(parents=True)
    (ours / "cgroup.controllers").write_text("cpu memory pids\n")
    (ours / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(_cgroup, "_mounts", lambda: [("/", str(tmp_path), "cgroup2", {"rw"})])
    monkeypatch.setattr(_cgroup, "_own_groups", lambda: {"": "/user.slice/me"})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_rmdir = os.rmdir

    def cgroupfs_rmdir(path):  # cgroupfs removes a group's files itself
        for entry in Path(path).iterdir():
            entry.unlink()
        real_rmdir(path)

    monkeypatch.setattr(os, "rmdir", cgroupfs_rmdir)
    cgroups = _cgroup.KernelCgroups(memory_bytes=128 << 20, max_pids=16)
    assert set(cgroups.controllers) == {"pids", "memory"} and not cgroups.problems
    assert all(c.v2 and Path(c.base).parent == ours for c in cgroups.controllers.values())
    group = cgroups.create()
    kernel_dir = Path(group.dirs["memory"])
    assert (kernel_dir / "memory.max").read_text() == str(128 << 20)
    assert (Path(group.dirs["pids"]) / "pids.max").read_text() == "16"
    assert group.dirs["pids"] == group.dirs["memory"]  # one v2 group holds both controllers
    assert group.procs_files == [str(kernel_dir / "cgroup.procs")]
    assert group.join_files == [str(kernel_dir / "cgroup.procs")]  # v2 has no "tasks"
    assert not group.oom_killed()
    (kernel_dir / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert group.oom_killed()
    group.remove()
    cgroups.close()
    assert [p.name for p in ours.iterdir() if p.is_dir()] == []


def test_prestarted_kernels_are_replenished_and_never_shared():
    with make_sandbox("local", prestart=2, **LIMITS) as sb:
        assert _wait_until(lambda: len(sb._spares) == 2)
        sessions = [sb.session() for _ in range(3)]
        for index, s in enumerate(sessions):
            assert run_ok(s, f"print('seen' in globals())\nseen = {index}") == "False\n"
        assert _wait_until(lambda: len(sb._spares) == 2)
        assert len({s.kernel_pid for s in sessions} | {k.pid for k in sb._spares}) == 5
        zygote = sb.zygote_pid
    assert _wait_until(lambda: not _descendants(zygote) and not psutil.pid_exists(zygote))


def test_limits_are_validated():
    with pytest.raises(ValueError):
        make_sandbox("local", memory_mb=0)
    with pytest.raises(TypeError):
        make_sandbox("local", memory_gb=1)
    with pytest.raises(ValueError):
        make_sandbox("local", prestart=-1)


def test_sandbox_pickles_as_its_configuration(local_sandbox):
    clone = pickle.loads(pickle.dumps(local_sandbox))
    try:
        assert clone.limits == local_sandbox.limits == Limits(**LIMITS)
        assert clone.zygote_pid != local_sandbox.zygote_pid
        assert clone.run("print('clone')").stdout == "clone\n"
    finally:
        clone.close()


def _use_inherited_sandbox(sandbox, queue) -> None:
    with sandbox.session() as s:
        queue.put(s.run("print('from the child')").stdout)
    sandbox.close()


def test_sandbox_inherited_through_fork_starts_over_in_the_child(local_sandbox):
    with local_sandbox.session() as s:
        run_ok(s, "mine = 'parent'")
        lock_holder = threading.Thread(target=lambda: s.run("import time; time.sleep(0.5)"))
        lock_holder.start()  # a run in flight (locks held) while we fork
        time.sleep(0.1)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_use_inherited_sandbox, args=(local_sandbox, queue))
        child.start()
        assert queue.get(timeout=30) == "from the child\n"
        child.join(30)
        lock_holder.join()
        assert child.exitcode == 0
        assert run_ok(s, "print(mine)") == "parent\n"  # the child left our kernel alone
    assert local_sandbox.run("print('parent still fine')").stdout == "parent still fine\n"


class SandboxEchoEnv(gym.Env):
    """The smallest env that runs its action as code in a sandbox session (for worker tests)."""

    charset = "".join(map(chr, range(9, 0x250)))
    observation_space = gym.spaces.Text(max_length=4096, charset=charset)
    action_space = gym.spaces.Text(max_length=4096, charset=charset)

    def __init__(self):
        self.sandbox = make_sandbox("local", prestart=0, **LIMITS)
        self.session = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.session is not None:
            self.session.close()
        self.session = self.sandbox.session()
        return "", {}

    def step(self, action):
        result = self.session.run(action)
        return result.stdout, float(result.ok), False, False, {"status": result.status.value}

    def close(self):
        self.sandbox.close()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_async_vector_env_workers(context):
    # shared_memory=False: gymnasium pads Text observations in shared memory
    envs = gym.vector.AsyncVectorEnv([SandboxEchoEnv] * 2, context=context, shared_memory=False)
    try:
        envs.reset(seed=0)
        obs, reward, *_ = envs.step(["import os\nn = 3\nprint(n)", "n = 4\nprint(n)"])
        assert list(obs) == ["3\n", "4\n"] and list(reward) == [1.0, 1.0]
        obs, *_ = envs.step(["print(n * 10)", "print(n * 10)"])
        assert list(obs) == ["30\n", "40\n"]
    finally:
        envs.close()
