"""The sandbox contract every backend implements.

A ``Sandbox`` owns the expensive, shared machinery (a warm zygote process, a pool of containers).
A ``Session`` is one episode's stateful Python kernel: globals persist across ``run`` calls, like a
notebook cell sequence, and nothing is shared between sessions.
"""

from __future__ import annotations

import abc
import enum
import os
import weakref
from dataclasses import dataclass, field


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (owned by anyone): leftovers of a dead owner are
    reclaimed, a live owner's are not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExecStatus(str, enum.Enum):
    """Outcome of one ``Session.run``; ``INFRA_ERROR`` means the sandbox broke, not the code."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    OUTPUT_LIMIT = "output_limit"
    INFRA_ERROR = "infra_error"


@dataclass(frozen=True)
class ExecResult:
    status: ExecStatus
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is ExecStatus.OK

    def to_dict(self) -> dict:
        return {
            "status": self.status.value,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "duration_s": self.duration_s,
        }


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every kernel; each one is a knob because workloads differ."""

    timeout_s: float = 10.0
    """Default wall-clock limit per ``run`` call; the kernel (and all it forked) is killed past it."""
    memory_mb: int = 1024
    """Address-space / cgroup memory cap per kernel."""
    cpu_s: int = 60
    """CPU-time rlimit per kernel (a second line of defence behind the wall clock)."""
    max_output_bytes: int = 64 * 1024
    """stdout/stderr beyond this are cut and the run is reported as ``output_limit``."""
    file_size_mb: int = 16
    """Largest file the code may write in its private tmp dir."""
    max_open_files: int = 256
    max_pids: int = 64
    """Processes and threads per kernel (cgroup pids.max where available)."""


@dataclass
class Isolation:
    """Which isolation layers are actually active; reported, never silently assumed."""

    layers: dict[str, bool] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [name for name, active in self.layers.items() if not active]


class SandboxError(RuntimeError):
    """The sandbox cannot be started or used (as opposed to the user's code failing)."""


class Session(abc.ABC):
    """One stateful kernel. Use as a context manager or call ``close``."""

    @abc.abstractmethod
    def run(self, code: str, timeout: float | None = None) -> ExecResult: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sandbox(abc.ABC):
    """Factory of sessions. Use as a context manager or call ``close``.

    Backends keep their constructor arguments in ``_options``, call ``_track()`` once started and
    ``_untrack()`` on close. Then a sandbox pickles as its configuration (a spawned worker, e.g. of
    ``AsyncVectorEnv``, builds its own zygote or pool) and, in a forked child, its
    ``_after_fork_in_child`` drops what belongs to the parent.
    """

    limits: Limits
    isolation: Isolation
    _options: dict

    def _track(self) -> None:
        _live_sandboxes.add(self)

    def _untrack(self) -> None:
        _live_sandboxes.discard(self)

    def _after_fork_in_child(self) -> None:
        """Forget processes, threads and locks inherited from the parent (they are not ours)."""

    def __reduce__(self):
        return (_restore_sandbox, (type(self), self._options))

    @abc.abstractmethod
    def session(self) -> Session: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        """Run one snippet in a throwaway session."""
        with self.session() as session:
            return session.run(code, timeout=timeout)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _restore_sandbox(cls: type[Sandbox], options: dict) -> Sandbox:
    return cls(**options)


_live_sandboxes: weakref.WeakSet[Sandbox] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sandbox in list(_live_sandboxes):
        sandbox._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
