"""The default sandbox: warm, forked, namespaced Python kernels on this machine.

Why a zygote: a fresh interpreter costs tens of milliseconds (hundreds with numpy and sympy);
forking a process that already imported them costs about a millisecond, and a warm kernel
answers a cell in a fraction of one, over a single socket round trip.
Why namespaces and limits rather than checks on the code: the kernel sits behind the operating
system's own walls (no network, an allow-list read-only filesystem, no privileges, rlimits and
cgroups), which no rewriting of the code can talk its way around. ``_kernel.py`` describes the
process tree; this module is the host side: zygote lifecycle, kernel handles, timeouts, statuses.

Semantics worth knowing:
- A session's kernel keeps its globals across ``run`` calls, in a real ``__main__`` module (so
  multiprocessing can pickle functions the cells define). Processes a cell starts do not outlive
  the cell where the kernel has its own pid namespace (threads do): use a multiprocessing Pool
  within one cell.
- When a cell times out, crashes or is OOM-killed, its kernel dies with everything it forked. The
  result says so in ``stderr``; the next ``run`` of the same session starts a fresh kernel, so
  earlier variables are gone.
- ``stdout``/``stderr`` are cut at ``max_output_bytes`` each (the cell is stopped once it writes
  past that; the status is then ``output_limit``, even if the cell also raised) and decoded as
  UTF-8 with replacement characters, so they are always valid text. Output written before a
  timeout or crash is kept.
- ``memory_mb`` is what the code may allocate on top of the preloaded interpreter (RLIMIT_AS is
  set that far above the kernel's starting address space; the cgroup, which also sees tmpfs and
  pipes, caps the pages the kernel adds). ``cpu_s`` is a budget for the kernel's lifetime, a
  backstop behind the per-run wall clock. The writable /tmp is a tmpfs of ``tmp_size_mb``.
- What the kernel sees of the host: /usr, /etc and the interpreter's own directories (its venv
  and base prefix), read-only; nothing else. It runs as ``sandbox_uid`` when we are root.
- Each kernel takes ~10 MB of private memory besides what it shares with the zygote.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from tir_envs.sandbox import _kernel as wire
from tir_envs.sandbox import cell
from tir_envs.sandbox._cgroup import KernelCgroups, KernelGroup
from tir_envs.sandbox.base import (
    ExecResult,
    ExecStatus,
    Isolation,
    Limits,
    Sandbox,
    SandboxError,
    Session,
)

log = logging.getLogger(__name__)

KERNEL_SCRIPT = Path(__file__).with_name("_kernel.py")
ZYGOTE_START_TIMEOUT_S = 120.0
KERNEL_START_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0
NAMESPACE_LAYERS = ("user_ns", "net_ns", "mount_ns", "pid_ns", "ipc_ns")
SETUP_LAYERS = (*NAMESPACE_LAYERS, "filesystem_view")
"""Layers the probe may switch off when this machine refuses them. Dropping privileges is not
one of them: a kernel that cannot shed root does not start at all."""
REPORTED_LAYERS = (*NAMESPACE_LAYERS, "readonly_root", "private_tmp", "hidden_host_paths",
                   "unprivileged", "scrubbed_env", "rlimits", "cgroup_pids", "cgroup_memory")
ZYGOTE_ENV = {"PATH": wire.KERNEL_ENV["PATH"], "LANG": "C.UTF-8", **wire.THREAD_ENV}

_missing_logged: set[str] = set()
_missing_logged_lock = threading.Lock()


def _warn_once(key: str, message: str, *args) -> None:
    """Log a machine-level shortcoming once per process, not once per sandbox or env."""
    with _missing_logged_lock:
        if key in _missing_logged:
            return
        _missing_logged.add(key)
    log.warning(message, *args)


class _SetupFailed(SandboxError):
    def __init__(self, layer: str, error: str):
        super().__init__(f"kernel setup failed at {layer}: {error}")
        self.layer, self.error = layer, error


# --------------------------------------------------------------------------------------------
# Framed socket reading with a deadline (the kernel's side is untrusted: lengths are checked,
# unexpected file descriptors closed).
# --------------------------------------------------------------------------------------------


class _ProtocolError(Exception):
    pass


class _Channel:
    FD_SPACE = socket.CMSG_SPACE(4 * struct.calcsize("i"))

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def send(self, kind: int, payload: bytes) -> None:
        wire.send_frame(self.sock, kind, payload)

    def read(self, deadline: float) -> tuple[int, bytes, list[int]] | None:
        """The next frame; ``None`` once the kernel side has closed; TimeoutError at deadline."""
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000) + 1)):
                if time.monotonic() >= deadline:
                    raise TimeoutError
                continue
            data, ancillary, _flags, _addr = self.sock.recvmsg(65536, self.FD_SPACE)
            for level, kind, blob in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(blob) - len(blob) % 4
                    self._fds.extend(struct.unpack(f"{usable // 4}i", blob[:usable]))
            if not data:
                return None
            self._buf += data

    def _parse(self) -> tuple[int, bytes, list[int]] | None:
        if len(self._buf) < wire.HEADER.size:
            return None
        length, kind = wire.HEADER.unpack_from(self._buf)
        if length > wire.MAX_FRAME:
            raise _ProtocolError(f"frame of {length} bytes")
        end = wire.HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[wire.HEADER.size:end])
        del self._buf[:end]
        fds, self._fds = self._fds, []
        return kind, payload, fds

    def close(self) -> None:
        _close_fds(self._fds)
        self._fds = []
        self.sock.close()


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# The zygote
# --------------------------------------------------------------------------------------------


def _stop_zygote(proc: subprocess.Popen, sock: socket.socket) -> None:
    sock.close()  # the zygote exits when its control socket closes
    try:
        proc.wait(KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Zygote:
    """The warm process kernels are forked from; talks over one control socket."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(KERNEL_SCRIPT), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=ZYGOTE_ENV, cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise SandboxError(f"cannot start the sandbox zygote: {exc}") from exc
        finally:
            theirs.close()
        self.sock = ours
        self._finalizer = weakref.finalize(self, _stop_zygote, self.proc, ours)
        channel = _Channel(ours)
        try:
            frame = channel.read(time.monotonic() + ZYGOTE_START_TIMEOUT_S)
        except (TimeoutError, OSError, _ProtocolError) as exc:
            self.close()
            raise SandboxError(f"the sandbox zygote did not start: {exc!r}") from exc
        if frame is None or frame[0] != wire.READY_ZYGOTE:
            self.close()
            raise SandboxError(f"the sandbox zygote exited during start (code {self.proc.poll()})")
        self.report = json.loads(frame[1])
        for problem in self.report["missing"]:
            _warn_once(f"preload {problem}", "the sandbox zygote could not preload %s", problem)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, config: dict, kernel_sock: socket.socket) -> None:
        wire.send_frame(self.sock, wire.SPAWN, json.dumps(config).encode(), [kernel_sock.fileno()])

    def close(self) -> None:
        self._finalizer()

    def abandon(self) -> None:
        """In a forked child: forget the parent's zygote without stopping it."""
        self._finalizer.detach()
        self.sock.close()


# --------------------------------------------------------------------------------------------
# One kernel, seen from the host
# --------------------------------------------------------------------------------------------


def _release_kernel(pidfd: int, fds: list[int], channel: _Channel, group: KernelGroup | None,
                    tmp_dir: str | None) -> None:
    """Kill the kernel's namespace (a no-op if already dead), wait for it, free what it held."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    select.select([pidfd], [], [], KILL_WAIT_S)  # readable once the init (and its ns) is gone
    _close_fds([pidfd, *fds])
    channel.close()
    if group is not None:
        if group.kill_stragglers:
            group.kill_all()
        group.remove()
    if tmp_dir is not None:
        shutil.rmtree(tmp_dir, ignore_errors=True)


class _Kernel:
    def __init__(self, channel: _Channel, pid: int, pidfd: int, out_fd: int, err_fd: int,
                 group: KernelGroup | None, tmp_dir: str | None, limits: Limits, report: dict):
        self.channel, self.pid, self.pidfd = channel, pid, pidfd
        self.out_fd, self.err_fd, self.group, self.limits = out_fd, err_fd, group, limits
        self.report = report
        self.alive = True
        self._signal_lock = threading.Lock()  # never signal through a pidfd number reused
        self._finalizer = weakref.finalize(self, _release_kernel, pidfd, [out_fd, err_fd],
                                           channel, group, tmp_dir)

    def run(self, code: str, timeout: float) -> ExecResult:
        start = time.monotonic()
        note = ""
        try:
            self.channel.send(wire.RUN, code.encode("utf-8", "surrogatepass"))
            frame = self.channel.read(start + timeout)
        except TimeoutError:
            status = ExecStatus.TIMEOUT
            note = (f"TimeoutError: the cell ran longer than {timeout:g} s and was killed "
                    "with everything it started")
            self.kill()
        except OSError:  # the kernel and its supervisor are both gone
            status, note = self._interpret(None)
        except _ProtocolError as exc:  # the code wrote garbage into the kernel's socket
            status, note = ExecStatus.ERROR, f"SandboxError: kernel protocol broken ({exc})"
            self.kill()
        else:
            status, note = self._interpret(frame)
        stdout, stderr, truncated = self._collect_output()
        if truncated and status in (ExecStatus.OK, ExecStatus.ERROR):
            status = ExecStatus.OUTPUT_LIMIT
        if status is ExecStatus.OUTPUT_LIMIT:
            note += (f"\nOutputLimitExceeded: output is cut at {self.limits.max_output_bytes} "
                     "bytes per stream and the cell was stopped there")
        if not self.alive:
            self.release()
            note += ("\nThe kernel restarts on the next run: variables from earlier runs are gone.")
        if note:
            stderr = f"{stderr}\n{note.strip()}\n" if stderr else f"{note.strip()}\n"
        return ExecResult(status, stdout, stderr, time.monotonic() - start)

    def _interpret(self, frame) -> tuple[ExecStatus, str]:
        if frame is None:
            self.kill()
            if self._oom_killed():
                return ExecStatus.MEMORY, cell.memory_note(self.limits.memory_mb)
            return ExecStatus.INFRA_ERROR, "SandboxError: the kernel vanished"
        kind, payload, fds = frame
        _close_fds(fds)
        if kind == wire.RESULT and len(payload) == 1 and payload[0] in (
                wire.OK, wire.ERROR, wire.MEMORY, wire.OUTPUT_LIMIT):
            return ExecStatus(wire.STATUSES[payload[0]]), ""
        if kind == wire.DIED and len(payload) == wire.DIED_PAYLOAD.size:
            self.kill()
            wait_status, cpu_used_s = wire.DIED_PAYLOAD.unpack(payload)
            status, note = cell.death_status(
                wait_status, cpu_used_s, memory_mb=self.limits.memory_mb,
                cpu_s=self.limits.cpu_s, oom_killed=self._oom_killed())
            return ExecStatus(status), note
        self.kill()
        return ExecStatus.ERROR, "SandboxError: the kernel broke the sandbox protocol"

    def _oom_killed(self) -> bool:
        return self.group is not None and self.group.oom_killed()

    def _collect_output(self) -> tuple[str, str, bool]:
        cap = self.limits.max_output_bytes
        texts, truncated = [], False
        for fd in (self.out_fd, self.err_fd):
            data = os.pread(fd, cap + 1, 0)
            if data:
                os.ftruncate(fd, 0)
            if len(data) > cap:
                data, truncated = data[:cap], True
            texts.append(data.decode("utf-8", "replace"))
        return texts[0], texts[1], truncated

    def exited(self) -> bool:
        """Whether the kernel died while nobody was talking to it (a pidfd polls readable)."""
        return not self.alive or bool(select.select([self.pidfd], [], [], 0)[0])

    def kill(self) -> None:
        """SIGKILL the namespace init; safe from any thread, any number of times."""
        with self._signal_lock:
            if self.alive:
                self.alive = False
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except OSError:
                    pass

    def release(self) -> None:
        """Kill, wait, close the descriptors, remove the cgroup."""
        with self._signal_lock:
            self.alive = False
            self._finalizer()

    def abandon(self) -> None:
        """In a forked child: drop our copies of the parent's kernel without touching it."""
        self.alive = False
        if self._finalizer.detach():
            _close_fds([self.pidfd, self.out_fd, self.err_fd])
            self.channel.close()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class LocalSession(Session):
    """One episode's kernel. Thread-safe: concurrent ``run`` calls are served one at a time."""

    def __init__(self, sandbox: LocalSandbox):
        self._sandbox = sandbox
        self._lock = threading.Lock()
        self._kernel: _Kernel | None = None
        self._closed = False
        try:
            self._kernel = sandbox._acquire_kernel()
        except SandboxError as exc:  # reported by the first run as infra_error
            log.warning("sandbox kernel failed to start (will retry on run): %s", exc)

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"code must be str, not {type(code).__name__}")
        timeout = self._sandbox.limits.timeout_s if timeout is None else float(timeout)
        if not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        with self._lock:
            if self._closed:
                raise SandboxError("this sandbox session is closed")
            if self._kernel is None or not self._kernel.alive:
                try:
                    self._kernel = self._sandbox._acquire_kernel()
                except SandboxError as exc:
                    return ExecResult(ExecStatus.INFRA_ERROR, stderr=f"SandboxError: {exc}\n")
            result = self._kernel.run(code, timeout)
            if self._closed:  # closed from another thread while running
                return ExecResult(ExecStatus.INFRA_ERROR, result.stdout,
                                  "SandboxError: the session was closed during the run\n",
                                  result.duration_s)
            return result

    @property
    def kernel_pid(self) -> int | None:
        """Host pid of the kernel's namespace init (for monitoring); None before a start."""
        return self._kernel.pid if self._kernel is not None and self._kernel.alive else None

    def close(self) -> None:
        kernel = self._kernel
        self._closed = True
        if kernel is not None:
            kernel.kill()  # unblocks a run in progress on another thread
        with self._lock:
            if self._kernel is not None:
                self._kernel.release()
                self._kernel = None
        self._sandbox._forget(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._kernel is not None:
            self._kernel.abandon()
            self._kernel = None


class LocalSandbox(Sandbox):
    """Forked, namespaced Python kernels from a warm zygote. See the module docstring.

    Keyword arguments are the fields of ``Limits`` (or pass ``limits=``), plus:
    ``require_isolation``: raise ``SandboxError`` unless every isolation layer is active;
    ``tmp_size_mb``: size of each kernel's private tmpfs (default 4 x ``file_size_mb``);
    ``sandbox_uid``: the unprivileged host uid kernels run as when we are root;
    ``prestart``: kernels kept started and idle, so ``session()`` (and the restart after a
    timeout) takes one at once while a background thread forks the next (0: fork on demand).
    """

    def __init__(self, limits: Limits | None = None, *, require_isolation: bool = False,
                 tmp_size_mb: int | None = None, sandbox_uid: int = 65534, prestart: int = 1,
                 **limit_overrides):
        if sys.platform != "linux":
            raise SandboxError("the local sandbox needs Linux; use the docker backend")
        self.limits = dataclasses.replace(limits or Limits(), **limit_overrides)
        for field in dataclasses.fields(Limits):
            if not getattr(self.limits, field.name) > 0:
                raise ValueError(f"{field.name} must be positive")
        if prestart < 0:
            raise ValueError("prestart must be >= 0")
        self._options = {"limits": self.limits, "require_isolation": require_isolation,
                         "tmp_size_mb": tmp_size_mb, "sandbox_uid": sandbox_uid,
                         "prestart": prestart}
        self.prestart = prestart
        self.tmp_size_mb = tmp_size_mb or 4 * self.limits.file_size_mb
        self.sandbox_uid = sandbox_uid
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        self._sessions: weakref.WeakSet[LocalSession] = weakref.WeakSet()
        self._closed = False
        self._cgroups = KernelCgroups(self.limits.memory_mb << 20, self.limits.max_pids)
        self._cgroups_stale = False
        self._layers = {name: True for name in SETUP_LAYERS}
        self._spares: list[_Kernel] = []
        self._spares_changed = threading.Condition()
        self._refiller: threading.Thread | None = None
        self.isolation_problems: dict[str, str] = {}
        """Why each missing isolation layer is missing."""
        self._track()
        try:
            self.isolation = self._probe()
        except BaseException:
            self.close()
            raise
        missing = self.isolation.missing
        if require_isolation and missing:
            self.close()
            raise SandboxError(
                "isolation required but missing: "
                + "; ".join(f"{name} ({self.isolation_problems.get(name, '?')})"
                            for name in missing))
        for name in missing:
            _warn_once(name, "sandbox isolation layer %r is not active on this machine: %s",
                       name, self.isolation_problems.get(name, "unavailable"))
        self._request_refill()

    # ---- public -----------------------------------------------------------------------------

    def session(self) -> LocalSession:
        if self._closed:
            raise SandboxError("this sandbox is closed")
        session = LocalSession(self)
        self._sessions.add(session)
        return session

    @property
    def zygote_pid(self) -> int | None:
        zygote = self._zygote
        return zygote.proc.pid if zygote is not None and zygote.alive else None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions)
        for session in sessions:
            session.close()
        with self._spares_changed:
            self._spares_changed.notify_all()
            refiller, spares, self._spares = self._refiller, self._spares, []
        if refiller is not None:
            refiller.join(KERNEL_START_TIMEOUT_S)
        for kernel in spares:
            kernel.release()
        with self._lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None
        self._cgroups.close()
        self._untrack()


    # ---- kernels ----------------------------------------------------------------------------

    def _probe(self) -> Isolation:
        """Start one kernel with every layer; drop the layers this machine refuses, one by one."""
        problems = self.isolation_problems
        for _attempt in range(len(SETUP_LAYERS) + 2):
            try:
                kernel = self._start_kernel()
            except _SetupFailed as failure:
                if failure.layer == "cgroup":  # e.g. a delegated hierarchy we may not join
                    self._cgroups.disable(failure.error)
                    continue
                if not self._layers.get(failure.layer):
                    raise
                self._layers[failure.layer] = False
                problems[failure.layer] = failure.error
                if failure.layer == "mount_ns":
                    self._layers["filesystem_view"] = False
                continue
            report = kernel.report
            if self.prestart:
                self._spares.append(kernel)
            else:
                kernel.release()
            break
        else:
            raise SandboxError("could not start a sandbox kernel with any set of layers")
        for name in ("pids", "memory"):
            if name in self._cgroups.problems:
                problems[f"cgroup_{name}"] = self._cgroups.problems[name]
        if report["rlimit_failures"]:
            problems["rlimits"] = "; ".join(report["rlimit_failures"])
        view = self._layers["filesystem_view"]
        if not view:
            reason = problems.get("filesystem_view") or problems.get("mount_ns", "unavailable")
            for name in ("readonly_root", "private_tmp", "hidden_host_paths"):
                problems[name] = reason
        layers = {
            **{name: self._layers[name] for name in NAMESPACE_LAYERS},
            "readonly_root": view, "private_tmp": view, "hidden_host_paths": view,
            "unprivileged": True,
            "scrubbed_env": bool(report["layers"].get("scrubbed_env")),
            "rlimits": bool(report["layers"].get("rlimits")),
            "cgroup_pids": "pids" in self._cgroups.controllers,
            "cgroup_memory": "memory" in self._cgroups.controllers,
        }
        return Isolation(layers={name: layers[name] for name in REPORTED_LAYERS})

    def _acquire_kernel(self) -> _Kernel:
        """A prestarted kernel if one is ready, else a new one; either way ask for a refill."""
        kernel = None
        with self._spares_changed:
            while self._spares and kernel is None:
                kernel = self._spares.pop(0)
                if kernel.exited():
                    kernel.release()
                    kernel = None
        self._request_refill()
        return kernel if kernel is not None else self._start_kernel()

    def _request_refill(self) -> None:
        with self._spares_changed:
            if not self.prestart or self._closed:
                return
            if self._refiller is None or not self._refiller.is_alive():
                self._refiller = threading.Thread(target=self._refill, daemon=True,
                                                  name="tir-sandbox-prestart")
                self._refiller.start()
            self._spares_changed.notify_all()

    def _refill(self) -> None:
        """Background: keep ``prestart`` kernels ready; back off while kernels cannot start."""
        backoff = 0.0
        while True:
            with self._spares_changed:
                if backoff:
                    self._spares_changed.wait_for(lambda: self._closed, timeout=backoff)
                self._spares_changed.wait_for(
                    lambda: self._closed or len(self._spares) < self.prestart)
                if self._closed:
                    return
            try:
                kernel = self._start_kernel()
            except (SandboxError, OSError) as exc:
                if self._closed:
                    return
                backoff = min(max(2 * backoff, 0.5), 30.0)
                log.warning("could not prestart a sandbox kernel (retry in %.1f s): %s",
                            backoff, exc)
                continue
            backoff = 0.0
            with self._spares_changed:
                if self._closed:
                    kernel.release()
                    return
                self._spares.append(kernel)

    def _start_kernel(self) -> _Kernel:
        """Ask the zygote for a kernel (restarting a dead zygote once) and wait until it is up."""
        for attempt in (1, 2):
            try:
                return self._try_start_kernel()
            except _ZygoteLost as lost:
                if attempt == 2:
                    raise SandboxError(f"sandbox zygote keeps dying: {lost}") from None
                log.warning("sandbox zygote lost (%s); restarting it", lost)
        raise AssertionError("unreachable")

    def _try_start_kernel(self) -> _Kernel:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = _Channel(ours)
        try:
            group = self._kernel_cgroups().create() if self._cgroups.controllers else None
            if group is not None:
                group.kill_stragglers = not self._layers["pid_ns"]
            tmp_dir = None if self._layers["filesystem_view"] else self._host_tmp_dir()
        except OSError as exc:
            channel.close()
            theirs.close()
            raise SandboxError(f"cannot prepare a kernel's cgroup or tmp dir: {exc}") from exc
        config = {
            "layers": self._layers, "limits": dataclasses.asdict(self.limits),
            "uid": self.sandbox_uid, "tmp_size_mb": self.tmp_size_mb, "tmp_dir": tmp_dir,
            "cgroup_join": group.join_files if group else [],
        }
        pidfd = None
        fds: list[int] = []
        try:
            with self._lock:
                if self._closed:
                    raise SandboxError("this sandbox is closed")
                zygote = self._live_zygote()
                try:
                    zygote.spawn(config, theirs)
                except OSError as exc:
                    self._zygote = None
                    zygote.close()
                    raise _ZygoteLost(repr(exc)) from None
            theirs.close()
            deadline = time.monotonic() + KERNEL_START_TIMEOUT_S
            frame = self._expect(channel, deadline, zygote)
            if frame[0] != wire.PIDFD or len(frame[1]) != 4 or len(frame[2]) != 3:
                _close_fds(frame[2])
                raise SandboxError(f"unexpected first frame from a new kernel: {frame[0]}")
            (pid,) = struct.unpack("<I", frame[1])
            pidfd, out_fd, err_fd = fds = frame[2]
            frame = self._expect(channel, deadline, zygote)
            if frame[0] != wire.READY:
                raise SandboxError(f"unexpected frame from a starting kernel: {frame[0]}")
            return _Kernel(channel, pid, pidfd, out_fd, err_fd, group, tmp_dir, self.limits,
                           json.loads(frame[1]))
        except BaseException:
            theirs.close()
            if pidfd is not None:
                _release_kernel(pidfd, [fd for fd in fds if fd != pidfd], channel, group, tmp_dir)
            else:
                channel.close()
                if group is not None:
                    group.remove()
                if tmp_dir is not None:
                    shutil.rmtree(tmp_dir, ignore_errors=True)
            raise

    def _expect(self, channel: _Channel, deadline: float, zygote: _Zygote):
        try:
            frame = channel.read(deadline)
        except TimeoutError:
            with self._lock:  # a zygote that stopped answering is replaced on the next start
                if self._zygote is zygote:
                    self._zygote = None
            zygote.close()
            raise SandboxError("a new sandbox kernel did not start in time") from None
        except (OSError, _ProtocolError) as exc:
            raise SandboxError(f"a new sandbox kernel broke the protocol: {exc!r}") from None
        if frame is None:
            if not zygote.alive:
                with self._lock:
                    if self._zygote is zygote:
                        self._zygote = None
                raise _ZygoteLost(f"exit code {zygote.proc.poll()}")
            raise SandboxError("a new sandbox kernel exited during setup")
        if frame[0] == wire.SETUP_FAILED:
            _close_fds(frame[2])
            failure = json.loads(frame[1])
            raise _SetupFailed(failure["layer"], failure["error"])
        return frame

    def _live_zygote(self) -> _Zygote:
        """The zygote, started or restarted as needed (caller holds ``self._lock``)."""
        if self._zygote is not None and not self._zygote.alive:
            log.warning("sandbox zygote died (exit code %s); restarting it",
                        self._zygote.proc.poll())
            self._zygote.close()
            self._zygote = None
        if self._zygote is None:
            self._zygote = _Zygote()
        return self._zygote

    def _kernel_cgroups(self) -> KernelCgroups:
        """Ours; in a forked child, a fresh set (made on first use) instead of the parent's."""
        with self._lock:
            if self._cgroups_stale:
                self._cgroups_stale = False
                use = bool(self._cgroups.controllers)
                self._cgroups = KernelCgroups(self.limits.memory_mb << 20, self.limits.max_pids)
                if not use:
                    self._cgroups.disable("disabled in the parent process")
            return self._cgroups

    def _host_tmp_dir(self) -> str:
        """Without a filesystem view, each kernel still gets a directory of its own."""
        path = tempfile.mkdtemp(prefix="tir-kernel-")
        if os.geteuid() == 0:
            os.chown(path, self.sandbox_uid, self.sandbox_uid)
        return path

    def _forget(self, session: LocalSession) -> None:
        self._sessions.discard(session)

    def _after_fork_in_child(self) -> None:
        """Locks may be held by threads that do not exist here, and the zygote, kernels and
        cgroups belong to the parent: start over lazily, without touching theirs."""
        self._lock = threading.Lock()
        self._spares_changed = threading.Condition()
        self._refiller = None
        for kernel in self._spares:
            kernel.abandon()
        self._spares = []
        if self._zygote is not None:
            self._zygote.abandon()
            self._zygote = None
        self._cgroups.abandon()
        self._cgroups_stale = True
        for session in list(self._sessions):
            session._after_fork_in_child()


class _ZygoteLost(Exception):
    pass


