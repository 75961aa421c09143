"""How a sandboxed kernel runs a code cell: the one copy both backends' kernels share.

The local kernel (``_kernel.py``) and the docker runner (``sandbox_image/runner.py``, with this
file copied beside it into the image) speak different wire protocols to their hosts, but they run
a cell the same way: in one real ``__main__`` whose globals persist, with fresh capped stdio, the
outcome mapped to a status, the cell's processes killed when it ends, under the same rlimits, and
a kernel's death read the same way. Keeping that here stops the two from drifting apart.

Standard library only and no import of the rest of ``tir_envs``: both kernels run by path under
``python -I`` and load this file from their own directory, before they fork any kernel.
"""

from __future__ import annotations

import builtins
import io
import linecache
import os
import resource
import signal
import sys
import time
import traceback
import types

STRAY_PATIENCE_S = 1.0
"""How long a kernel keeps killing what its cell left running before it replies anyway."""
CPU_USED_FRACTION = 0.8
"""rusage is sampled on clock ticks while RLIMIT_CPU counts exact runtime: a kernel killed at its
CPU limit may show a little less than the limit."""


class OutputLimitExceeded(BaseException):
    """Stops a cell that prints past the cap; a BaseException so ``except Exception`` won't eat it."""


class CappedWriter(io.RawIOBase):
    """Raw writer over an output fd that stops the cell once ``room`` bytes have gone out."""

    def __init__(self, fd: int, room: int):
        self._fd = fd
        self._room = room
        self._retired = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def retire(self) -> None:
        """Drop whatever comes later: a stale stream of an earlier cell, flushed when it is garbage
        collected or kept by the code, must neither leak into nor stop the current cell."""
        self._retired = True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._retired:
            return len(view)
        n = min(len(view), self._room)
        self._room -= n
        rest = view[:n]
        while rest:
            rest = rest[os.write(self._fd, rest) :]
        if n < len(view):
            raise OutputLimitExceeded
        return len(view)


class Streams:
    """The kernel's stdio, made anew for every cell, whatever the cell before did to it."""

    def __init__(self, out_fd: int, err_fd: int, cap: int):
        """``out_fd``, ``err_fd``: the kernel's private copies of its output pipes, restored onto
        fds 1 and 2 before every cell, so a cell that closes those breaks only itself."""
        self._fds = (out_fd, err_fd)
        self._cap = cap
        self._writers: list[CappedWriter] = []
        self._stdin = None
        self.reset()

    def reset(self) -> None:
        """Fds 1 and 2 and fresh sys.stdin/stdout/stderr for the next cell; earlier ones retire.

        Line-buffered, so what a cell printed before a timeout still reaches the host.
        """
        for writer in self._writers:
            writer.retire()
        self._writers = []
        for fd, private in zip((1, 2), self._fds):
            os.dup2(private, fd)
        if sys.stdin is not self._stdin or self._stdin.closed:  # else as good as new: it reads EOF
            self._stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
            sys.stdin = self._stdin
        streams = []
        for fd, errors in ((1, "surrogatepass"), (2, "backslashreplace")):
            writer = CappedWriter(fd, self._cap)
            self._writers.append(writer)
            raw = io.BufferedWriter(writer, 8192)
            streams.append(io.TextIOWrapper(raw, "utf-8", errors, line_buffering=True))
        self.stdout, self.stderr = sys.stdout, sys.stderr = streams

    def flush(self) -> bool:
        """Flush this cell's streams (even if the code replaced sys.stdout); True if that went
        past the cap."""
        over = False
        for stream in (self.stdout, self.stderr):
            try:
                stream.flush()
            except OutputLimitExceeded:
                over = True
            except BaseException:  # noqa: BLE001 - a stream the code closed must not kill the kernel
                pass
        return over


class CellRunner:
    """Runs code cells in one real ``__main__`` module, so pickle (and multiprocessing) finds the
    functions the cells define, as in a script or a notebook."""

    def __init__(self, streams: Streams, kill_strays: bool):
        """``kill_strays``: whether ``kill(-1)`` reaches only what the cells started (see
        ``end_strays``)."""
        self.streams = streams
        self.kill_strays = kill_strays
        self.pid = os.getpid()
        main = types.ModuleType("__main__")
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        sys.argv = [""]  # as in an interactive interpreter; no trace of the kernel's own script
        self.globals = main.__dict__
        self.cells = 0

    def run(self, source: str) -> str:
        """Run one cell; its status: ``ok``, ``error``, ``memory`` or ``output_limit``."""
        self.cells += 1
        self.streams.reset()
        status = _execute(source, f"<cell {self.cells}>", self.globals, self.streams.stderr)
        if self.streams.flush() and status == "ok":
            status = "output_limit"
        if os.getpid() != self.pid:  # a process the cell forked fell off its end: exit as a script
            os._exit(0 if status == "ok" else 1)
        end_strays(self.kill_strays)
        return status


def _execute(source: str, filename: str, namespace: dict, stderr) -> str:
    """Compile and run ``source``; map how it ended to a status, printing any traceback."""
    try:
        compiled = compile(source, filename, "exec", dont_inherit=True)  # no __future__ of ours
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compiled, namespace)
    except OutputLimitExceeded:
        return "output_limit"
    except SystemExit as exc:
        if exc.code in (None, 0):
            return "ok"
        print_exception(exc, stderr)
        return "error"
    except MemoryError as exc:
        print_exception(exc, stderr)
        return "memory"
    except BaseException as exc:  # noqa: BLE001 - the cell's failure is its result
        print_exception(exc, stderr)
        return "error"
    return "ok"


def print_exception(exc: BaseException, stderr) -> None:
    """Print the traceback as the cell's own: the leading frames of this file are hidden.

    It goes to the cell's stderr stream even if the code replaced ``sys.stderr``.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        traceback.print_exception(type(exc), exc, tb, file=stderr)
    except BaseException:  # noqa: BLE001 - out of memory or output while reporting: status says it
        pass


def end_strays(kill: bool, patience_s: float = STRAY_PATIENCE_S) -> None:
    """Processes a cell started do not outlive it; exited children are collected either way.

    ``kill``: ``kill(-1)`` reaches every process of ours except this one and the namespace's init,
    which is exactly what the cells left running where the kernel is that init (local, in its own
    pid namespace) or alone with it in a container (docker, as a child subreaper, so the orphans
    come back here too). Elsewhere it would hit the host. It is repeated until no child is left:
    a child forked while ``kill(-1)`` walked the task list escapes one round.
    """
    deadline = time.monotonic() + patience_s
    while True:
        if kill:
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return  # no child left
        if not kill or time.monotonic() > deadline:
            return
        time.sleep(0.0005)


def set_limits(
    *, address_space_mb: int, cpu_s: int, file_size_mb: int, max_open_files: int,
    max_processes: int | None = None,
) -> list[str]:
    """Apply the kernel's rlimits; returns those this machine refused.

    The address space counts from what is already mapped (the preloaded numpy and sympy), so the
    code gets ``address_space_mb`` on top. The CPU budget's soft limit equals the hard one: the
    kernel gets SIGKILL, which the code can neither catch nor ignore (SIGXCPU it can, and a pid
    namespace's init never sees it). A file past its size limit is an OSError in the cell: Python
    ignores SIGXFSZ from startup. ``max_processes`` only where RLIMIT_NPROC counts this kernel
    alone (its own user namespace).
    """
    mb = 1024 * 1024
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    wanted = {
        "RLIMIT_AS": mapped + address_space_mb * mb,
        "RLIMIT_CPU": cpu_s,
        "RLIMIT_FSIZE": file_size_mb * mb,
        "RLIMIT_NOFILE": max_open_files,
        "RLIMIT_CORE": 0,
    }
    if max_processes is not None:
        wanted["RLIMIT_NPROC"] = max_processes
    failed = []
    for name, value in wanted.items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (OSError, ValueError) as exc:
            failed.append(f"{name}: {exc}")
    return failed


def memory_note(memory_mb: int) -> str:
    return f"MemoryError: the kernel exceeded its {memory_mb} MB memory limit and was killed"


def death_status(
    wait_status: int, cpu_used_s: float, *, memory_mb: int, cpu_s: int, oom_killed: bool | None
) -> tuple[str, str]:
    """Status and message for a kernel that died mid-cell.

    ``oom_killed``: whether the memory cgroup counted an OOM kill of it; None where there is no
    counter to ask, and a SIGKILL that the CPU budget does not explain is then taken for one.
    """
    if os.WIFEXITED(wait_status):
        code = os.WEXITSTATUS(wait_status)
        return ("ok" if code == 0 else "error"), f"The kernel process exited with code {code}."
    sig = os.WTERMSIG(wait_status)
    if sig == signal.SIGKILL and oom_killed:
        return "memory", memory_note(memory_mb)
    if sig in (signal.SIGKILL, signal.SIGXCPU) and cpu_used_s >= CPU_USED_FRACTION * cpu_s:
        return "timeout", (
            f"TimeoutError: the kernel used up its CPU time limit ({cpu_s} s) and was killed"
        )
    if sig == signal.SIGKILL and oom_killed is None:
        return "memory", memory_note(memory_mb)
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return "error", f"KernelDied: the kernel was killed by {name}"
