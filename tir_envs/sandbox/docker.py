"""Docker sandbox backend: one locked-down container per live session, kept warm in a pool.

Each container runs ``sandbox_image/runner.py`` as PID 1: a zygote that imported numpy and sympy
once and forks one kernel per session, which runs cells with ``cell.py`` as the local kernel
does. The host speaks to it over the container's attached
stdin/stdout (one hijacked HTTP connection per container, no ``exec`` per call), so a warm run
costs well under a millisecond on top of the code itself on an idle machine.

A container serves one session at a time, which is what lets the runner ``kill(-1)`` everything
(daemons the code forked included) and wipe its tmpfs when the session ends; the container then
goes back to the pool. A container that hangs or dies is removed and replaced. Containers carry
the ``tir-gym.sandbox`` label, are started with ``auto_remove`` and see their stdin close when this
process dies, so a crashed run leaves nothing behind; ``remove_leftovers`` sweeps what remains.

Build the image first: ``sandbox_image/build.sh`` (``scripts/docker_engine.sh`` also starts dockerd).
The build labels the image with a digest of its sources; in a checkout, an image built from other
sources (an older runner or cell module) is refused with the command that rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
import weakref
from pathlib import Path

from tir_envs.sandbox.base import (
    ExecResult,
    ExecStatus,
    Isolation,
    Limits,
    Sandbox,
    SandboxError,
    Session,
    pid_alive,
)

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "tir-sandbox:latest"
SOURCES_LABEL = "tir-gym.sources"
"""Image label: the sha256 of the files the image is built from (``sources_digest``)."""
IMAGE_SOURCES = (
    Path(__file__).resolve().parents[2] / "sandbox_image" / "Dockerfile",
    Path(__file__).resolve().parents[2] / "sandbox_image" / "runner.py",
    Path(__file__).resolve().with_name("cell.py"),
)
"""What ``sandbox_image/build.sh`` puts in the build context, in the order it hashes them."""
LABEL = "tir-gym.sandbox"
OWNER_LABEL = "tir-gym.owner"
POOL_LABEL = "tir-gym.pool"
SANDBOX_USER = "10001:10001"
RUNNER_MEMORY_MB = 128
"""Container memory beyond ``memory_mb``: the runner's share (about 55 MB when idle) and the page
cache python needs. The runner itself holds the kernel to ``memory_mb`` of heap and /tmp files
(as the local backend's per-kernel cgroup does); the container's limit is the backstop."""
RUNNER_PIDS = 8
"""Pids above ``max_pids`` so the runner can still fork a fresh kernel after a fork bomb."""
GRACE_S = 10.0
"""How long past the code's timeout the runner may take to answer before its container is killed."""
START_TIMEOUT_S = 60.0
CONTROL_TIMEOUT_S = 15.0
MAX_CODE_CHARS = 4 * 1024 * 1024
"""Longer code is refused with an ``error`` result instead of being shipped to a container."""


class _ContainerFault(Exception):
    """The container stopped answering properly; it must be removed."""


class _ContainerHung(_ContainerFault):
    """The runner did not answer in time."""


def _owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


def remove_leftovers(client) -> int:
    """Remove sandbox containers whose owning process on this host is gone; returns how many.

    Containers normally remove themselves when their owner dies (stdin closes, the runner exits,
    ``auto_remove``); this catches one killed between create and attach. ``scripts/docker_engine.sh``
    removes every labelled container before CI runs.
    """
    host = socket.gethostname()
    removed = 0
    found = client.containers.list(all=True, filters={"label": LABEL}, ignore_removed=True)
    for container in found:
        owner_host, _, owner_pid = container.labels.get(OWNER_LABEL, "").rpartition("/")
        stale = owner_host == host and owner_pid.isdigit() and not pid_alive(int(owner_pid))
        if stale:
            _force_remove(container)
            removed += 1
    if removed:
        log.info("removed %d leftover sandbox container(s)", removed)
    return removed


def _force_remove(container) -> None:
    import docker.errors

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if "already in progress" not in str(exc):
            log.warning("could not remove sandbox container %s: %s", container.short_id, exc)


class _Container:
    """One pool container and the framed-JSON channel to its runner."""

    def __init__(self, client, image: str, limits: Limits, tmp_mb: int, cpus: float, pool: str):
        import docker.errors

        try:
            self.container = self._create(client, image, limits, tmp_mb, cpus, pool)
        except docker.errors.DockerException as exc:
            raise _ContainerFault(f"could not create a container: {exc}") from exc
        try:
            attached = client.api.attach_socket(
                self.container.id,
                params={"stdin": 1, "stdout": 1, "stream": 1, "detachKeys": "ctrl-@"},
            )
            self._sock: socket.socket = getattr(attached, "_sock", attached)
            self._attached = attached  # keeps the hijacked HTTP response alive
            self._raw = bytearray()  # docker's multiplexed stream, not yet demultiplexed
            self._out = bytearray()  # the runner's stdout
            self.container.start()
            self.facts = self.request({"op": "hello"}, time.monotonic() + START_TIMEOUT_S)["facts"]
        except BaseException as exc:
            self.remove()
            if isinstance(exc, docker.errors.DockerException):
                raise _ContainerFault(f"could not start a container: {exc}") from exc
            raise

    @staticmethod
    def _create(client, image: str, limits: Limits, tmp_mb: int, cpus: float, pool: str):
        import docker.types

        memory = f"{_container_memory_mb(limits)}m"
        return client.containers.create(
            image,
            # detach=False + stdin_open sets StdinOnce: when this process dies its attach closes,
            # the runner reads EOF and exits, and auto_remove deletes the container.
            detach=False,
            stdin_open=True,
            tty=False,
            user=SANDBOX_USER,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={tmp_mb}m,mode=1777"},
            shm_size=16 * 1024 * 1024,
            mem_limit=memory,
            memswap_limit=memory,
            pids_limit=limits.max_pids + RUNNER_PIDS,
            nano_cpus=int(cpus * 1e9),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            environment={},
            hostname="sandbox",
            labels={LABEL: "1", OWNER_LABEL: _owner(), POOL_LABEL: pool},
            log_config=docker.types.LogConfig(
                type="json-file", config={"max-size": "1m", "max-file": "1"}
            ),
            auto_remove=True,
        )

    @property
    def short_id(self) -> str:
        return self.container.short_id

    def request(self, message: dict, deadline: float) -> dict:
        """Send one frame and wait for the reply; raises ``_ContainerFault`` on any breakage."""
        body = json.dumps(message, ensure_ascii=True).encode("ascii")
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            self._sock.sendall(b"%08x" % len(body) + body)
            size = int(self._read(8, deadline), 16)
            return json.loads(self._read(size, deadline))
        except _ContainerFault:
            raise
        except (OSError, ValueError) as exc:
            raise _ContainerFault(f"container {self.short_id}: {exc!r}") from exc

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self._out) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ContainerHung(f"container {self.short_id} did not answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not chunk:
                raise _ContainerFault(f"container {self.short_id} closed its output")
            self._raw += chunk
            self._demultiplex()
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    def _demultiplex(self) -> None:
        """Split docker's attach stream (8-byte header: stream id, 3 pad, big-endian size)."""
        while len(self._raw) >= 8:
            stream, size = struct.unpack(">BxxxI", self._raw[:8])
            if len(self._raw) < 8 + size:
                return
            payload = bytes(self._raw[8 : 8 + size])
            del self._raw[: 8 + size]
            if stream == 1:  # stdout; stderr is not attached (it goes to the container log)
                self._out += payload

    def oom_killed(self) -> bool:
        """Whether docker saw this container die of the cgroup OOM killer (best effort)."""
        import docker.errors

        try:
            self.container.reload()
        except docker.errors.DockerException:
            return False
        return bool(self.container.attrs.get("State", {}).get("OOMKilled"))

    def remove(self) -> None:
        try:
            self._sock.close()
        except (AttributeError, OSError):
            pass
        _force_remove(self.container)


def _container_memory_mb(limits: Limits) -> int:
    """The container's cgroup cap: the kernel's ``memory_mb`` (its /tmp files included) and the
    runner's share."""
    return limits.memory_mb + RUNNER_MEMORY_MB


def _isolation(facts: dict, network_filter: bool, container) -> Isolation:
    """Which layers are active, from the runner's own view and the engine's container record."""
    host_config = container.attrs.get("HostConfig", {})
    return Isolation(
        layers={
            "container": True,
            "network_none": facts["interfaces"] == ["lo"],
            "network_filter": network_filter,
            "read_only_rootfs": facts["read_only_rootfs"],
            "tmpfs_tmp": facts["tmp_tmpfs"],
            "non_root_user": facts["uid"] != 0,
            "no_capabilities": facts["cap_eff_zero"],
            "no_new_privileges": facts["no_new_privs"],
            "seccomp": facts["seccomp"],
            "memory_limit": bool(host_config.get("Memory")),
            "memory_watch": facts["memory_watch"],
            "pids_limit": bool(host_config.get("PidsLimit")),
            "rlimits": True,
        }
    )


class DockerSandbox(Sandbox):
    """A warm pool of hardened containers; each session leases one for its lifetime.

    Up to ``pool_size`` containers wait started and idle, so a new session costs one kernel fork
    (~10 ms); a closed session's container is wiped and goes back to the pool. The pool is topped
    up in the background when it runs dry; a session that finds it empty starts a container
    itself (about a second). ``pool_size=0`` starts one per session.

    Keyword arguments are the fields of ``Limits`` (or pass ``limits=``), plus: ``cpus`` per
    container; ``tmp_size_mb`` for its /tmp tmpfs (default 4 x ``file_size_mb``);
    ``require_isolation`` to raise ``SandboxError`` unless every layer is active.
    """

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        pool_size: int = 2,
        *,
        limits: Limits | None = None,
        cpus: float = 1.0,
        tmp_size_mb: int | None = None,
        require_isolation: bool = False,
        **limit_overrides,
    ):
        self.limits = dataclasses.replace(limits or Limits(), **limit_overrides)
        for field in dataclasses.fields(Limits):
            if not getattr(self.limits, field.name) > 0:
                raise ValueError(f"{field.name} must be positive")
        if pool_size < 0:
            raise ValueError("pool_size must be >= 0")
        self._options = dict(
            image=image,
            pool_size=pool_size,
            limits=self.limits,
            cpus=cpus,
            tmp_size_mb=tmp_size_mb,
            require_isolation=require_isolation,
        )
        self.image = image
        self.pool_size = pool_size
        self.pool_id = uuid.uuid4().hex[:12]
        """Value of the ``tir-gym.pool`` label on this sandbox's containers."""
        self.tmp_size_mb = tmp_size_mb or 4 * self.limits.file_size_mb
        self._cpus = cpus
        self._client = _connect()
        self._check_image()
        self._lock = threading.Lock()
        self._idle: list[_Container] = []
        self._live: set[_Container] = set()
        self._sessions: weakref.WeakSet[DockerSession] = weakref.WeakSet()
        self._refiller: threading.Thread | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _remove_all, self._live)
        self._track()
        remove_leftovers(self._client)
        try:
            self.isolation = self._probe()
        except BaseException:
            self.close()
            raise
        missing = self.isolation.missing
        if missing and require_isolation:
            self.close()
            raise SandboxError(f"isolation required but missing: {', '.join(missing)}")
        if missing:
            log.warning("docker sandbox runs without: %s", ", ".join(missing))
        self._refill()

    # --- public ----------------------------------------------------------------------------------

    def session(self) -> DockerSession:
        if self._closed:
            raise SandboxError("this sandbox is closed")
        session = DockerSession(self)
        self._sessions.add(session)
        return session

    def close(self) -> None:
        """Remove every container this sandbox started, leased ones included."""
        with self._lock:
            self._closed = True
            self._idle.clear()
            refiller = self._refiller
        if refiller is not None and refiller is not threading.current_thread():
            refiller.join(timeout=START_TIMEOUT_S)  # it removes what it was starting
        _remove_all(self._live)
        self._untrack()


    # --- pool ------------------------------------------------------------------------------------

    def _check_image(self) -> None:
        problem = image_problem(self._client, self.image)
        if problem:
            raise SandboxError(problem)

    def _probe(self) -> Isolation:
        """Start the first container, open and close a kernel in it, and read off the layers."""
        try:
            probe = self._start_container()
            opened = probe.request(self._open_message(), time.monotonic() + START_TIMEOUT_S)
            if not opened.get("ok"):
                raise _ContainerFault(opened.get("error", "the first kernel did not start"))
            probe.container.reload()
            isolation = _isolation(probe.facts, opened["network_filter"], probe.container)
            probe.request({"op": "close"}, time.monotonic() + CONTROL_TIMEOUT_S)
        except _ContainerFault as exc:
            raise SandboxError(f"the sandbox container did not start properly: {exc}") from exc
        self._release(probe)
        return isolation

    def _open_message(self) -> dict:
        # RLIMIT_AS sits above what the cgroup allows, so gradual growth meets the cgroup's OOM
        # killer (fast, reported as memory) and only absurd single allocations meet the rlimit
        # (a clean MemoryError). The other way round, CPython can flail for many seconds when
        # the address space runs out deep in a recursion.
        address_space_mb = _container_memory_mb(self.limits)
        limits = {**dataclasses.asdict(self.limits), "address_space_mb": address_space_mb}
        return {"op": "open", "limits": limits}

    def _start_container(self) -> _Container:
        if self._client is None:  # first use in a forked child
            self._client = _connect()
        container = _Container(
            self._client, self.image, self.limits, self.tmp_size_mb, self._cpus, self.pool_id
        )
        with self._lock:
            closed = self._closed
            if not closed:
                self._live.add(container)
        if closed:
            container.remove()
            raise SandboxError("this sandbox is closed")
        log.debug("started sandbox container %s", container.short_id)
        return container

    def _acquire(self) -> _Container:
        with self._lock:
            if self._closed:
                raise SandboxError("this sandbox is closed")
            container = self._idle.pop() if self._idle else None
        if container is None:
            container = self._start_container()
        self._refill(only_if_dry=True)
        return container

    def _release(self, container: _Container) -> None:
        """Back to the pool after a clean close, or gone if the pool is full or closed."""
        with self._lock:
            keep = not self._closed and len(self._idle) < self.pool_size
            if keep:
                self._idle.append(container)
        if not keep:
            self._discard(container)

    def _discard(self, container: _Container) -> None:
        with self._lock:
            self._live.discard(container)
        container.remove()
        self._refill(only_if_dry=True)

    def _refill(self, only_if_dry: bool = False) -> None:
        """Top the idle pool up in the background so the next session need not wait.

        After start-up only an empty pool is refilled: sessions hand their (wiped) containers
        back, so one-at-a-time episodes reuse the same warm containers and start none, and no
        container start competes for CPU with the code being run.
        """
        with self._lock:
            busy = self._refiller is not None and self._refiller.is_alive()
            full = len(self._idle) >= (1 if only_if_dry else self.pool_size)
            if busy or self._closed or full or self.pool_size == 0:
                return
            self._refiller = threading.Thread(
                target=self._refill_loop, name="tir-sandbox-refill", daemon=True
            )
            self._refiller.start()

    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed or len(self._idle) >= self.pool_size:
                    return
            try:
                container = self._start_container()
            except SandboxError:
                return
            except _ContainerFault as exc:  # retried on demand by the next session
                log.warning("could not start a sandbox container for the pool: %s", exc)
                return
            self._release(container)

    def _after_fork_in_child(self) -> None:
        """The containers, their sockets and the engine connection belong to the parent: forget
        them without touching them, and start a pool of our own when first needed."""
        self._finalizer.detach()
        self._lock = threading.Lock()
        self.pool_id = uuid.uuid4().hex[:12]
        self._client = None
        self._idle = []
        self._live = set()
        self._refiller = None
        self._finalizer = weakref.finalize(self, _remove_all, self._live)
        for session in list(self._sessions):
            session._after_fork_in_child()


def _connect():
    try:
        import docker
    except ImportError as exc:
        raise SandboxError(
            "the docker backend needs the docker SDK: pip install 'tir-gym[docker]'"
        ) from exc
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as exc:
        raise SandboxError(
            f"no usable Docker engine ({exc}); start one with scripts/docker_engine.sh"
        ) from exc
    return client


def unavailable_reason(image: str = DEFAULT_IMAGE) -> str | None:
    """Why a ``DockerSandbox`` cannot start here (no SDK, no engine, no image), or None if it can.

    Tests use it to skip with a clear reason outside CI and to fail inside it.
    """
    try:
        client = _connect()
    except SandboxError as exc:
        return str(exc)
    try:
        return image_problem(client, image)
    finally:
        client.close()


def sources_digest() -> str | None:
    """sha256 of the image's source files, concatenated as ``build.sh`` hashes them; None
    outside a checkout (an installed package does not ship ``sandbox_image/``)."""
    if not all(path.is_file() for path in IMAGE_SOURCES):
        return None
    return hashlib.sha256(b"".join(path.read_bytes() for path in IMAGE_SOURCES)).hexdigest()


def image_problem(client, image: str) -> str | None:
    """Why ``image`` cannot serve this checkout (missing, or built from other sources), or None."""
    import docker.errors

    rebuild = "build it with sandbox_image/build.sh (or scripts/docker_engine.sh)"
    try:
        labels = client.images.get(image).labels or {}
    except docker.errors.ImageNotFound:
        return f"docker image {image!r} not found; {rebuild}"
    expected = sources_digest()
    if expected is not None and labels.get(SOURCES_LABEL) != expected:
        return (f"docker image {image!r} was built from other sources than this checkout's "
                f"sandbox_image/ and cell.py (label {SOURCES_LABEL}="
                f"{labels.get(SOURCES_LABEL, 'missing')!r}, expected {expected[:12]}...); "
                f"re{rebuild}")
    return None


def _remove_all(live: set[_Container]) -> None:
    """Remove containers in parallel: each removal waits on the engine for ~0.1-0.5 s."""
    containers = list(live)
    live.clear()
    threads = [threading.Thread(target=c.remove, daemon=True) for c in containers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)



RESTART_NOTE = "The kernel restarts on the next run: variables from earlier runs are gone."


def _with_note(stderr: str, note: str) -> str:
    return f"{stderr}\n{note.strip()}\n" if stderr else f"{note.strip()}\n"


class DockerSession(Session):
    """One episode's kernel inside a leased container; globals persist across ``run`` calls.

    Thread-safe: concurrent ``run`` calls are served one at a time. When a cell times out,
    crashes or runs out of memory, its kernel dies and the result says so; the next ``run``
    starts a fresh one. If the container itself breaks, the run reports ``infra_error`` and the
    session moves to a new container.
    """

    def __init__(self, sandbox: DockerSandbox):
        self._sandbox = sandbox
        self._lock = threading.Lock()
        self._closed = False
        self._container: _Container | None = None
        try:
            self._container = self._lease()
        except _ContainerFault as exc:  # reported by the first run as infra_error
            log.warning("sandbox container failed to start (will retry on run): %s", exc)

    def _lease(self) -> _Container:
        """A container from the pool with a fresh kernel opened in it; skips broken idle ones."""
        for attempt in (1, 2, 3):
            container = self._sandbox._acquire()
            deadline = time.monotonic() + CONTROL_TIMEOUT_S
            try:
                reply = container.request(self._sandbox._open_message(), deadline)
                if reply.get("ok"):
                    return container
                fault = _ContainerFault(reply.get("error", "the kernel did not start"))
            except _ContainerFault as exc:
                fault = exc
            log.warning("container %s could not open a kernel: %s", container.short_id, fault)
            self._sandbox._discard(container)
        raise fault

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"code must be str, not {type(code).__name__}")
        limit = self._sandbox.limits.timeout_s if timeout is None else float(timeout)
        if not limit > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        start = time.monotonic()
        if len(code) > MAX_CODE_CHARS:
            return ExecResult(
                ExecStatus.ERROR,
                stderr=f"SandboxError: the code has {len(code)} characters; the limit is "
                f"{MAX_CODE_CHARS}\n",
            )
        with self._lock:
            if self._closed or self._sandbox._closed:
                raise SandboxError("this sandbox session is closed")
            if self._container is None:
                try:
                    self._container = self._lease()
                except (_ContainerFault, SandboxError) as exc:
                    return ExecResult(
                        ExecStatus.INFRA_ERROR, stderr=f"SandboxError: no sandbox container: {exc}\n"
                    )
            status, stdout, stderr = self._run_in(self._container, code, limit, start)
            if self._closed:  # closed from another thread while running
                status, stderr = ExecStatus.INFRA_ERROR, "SandboxError: the session was closed during the run\n"
        return ExecResult(status, stdout, stderr, time.monotonic() - start)

    def _run_in(
        self, container: _Container, code: str, limit: float, start: float
    ) -> tuple[ExecStatus, str, str]:
        message = {"op": "run", "code": code, "timeout": limit}
        try:
            reply = container.request(message, start + limit + GRACE_S)
        except _ContainerHung:
            log.warning("container %s hung past its timeout; replacing it", container.short_id)
            self._drop_container()
            note = (
                f"TimeoutError: the cell ran longer than {limit:g} s and was killed with "
                f"everything it started\n{RESTART_NOTE}"
            )
            return ExecStatus.TIMEOUT, "", _with_note("", note)
        except _ContainerFault as exc:
            oom = container.oom_killed()
            level = logging.DEBUG if self._closed else logging.WARNING  # closed from another thread
            log.log(level, "container %s failed (%s); replacing it", container.short_id, exc)
            self._drop_container()
            if oom:
                note = f"MemoryError: the sandbox container ran out of memory\n{RESTART_NOTE}"
                return ExecStatus.MEMORY, "", _with_note("", note)
            note = f"SandboxError: the sandbox container failed ({exc})\n{RESTART_NOTE}"
            return ExecStatus.INFRA_ERROR, "", _with_note("", note)
        if "status" not in reply:
            self._drop_container()
            note = f"SandboxError: {reply.get('error', 'bad reply from the runner')}\n{RESTART_NOTE}"
            return ExecStatus.INFRA_ERROR, "", _with_note("", note)
        if not reply["ok"]:
            log.warning("container %s could not clean up after its kernel", container.short_id)
            self._drop_container()
        return ExecStatus(reply["status"]), reply["stdout"], reply["stderr"]

    def _drop_container(self) -> None:
        if self._container is not None:
            self._sandbox._discard(self._container)
            self._container = None

    def close(self) -> None:
        """Kill the kernel and whatever it forked, wipe scratch space, return the container."""
        self._closed = True
        if not self._lock.acquire(blocking=False):
            running = self._container
            if running is not None:
                running.remove()  # a run on another thread: cut its connection to unblock it
            self._lock.acquire()
        try:
            container, self._container = self._container, None
        finally:
            self._lock.release()
        self._sandbox._sessions.discard(self)
        if container is None:
            return
        if self._sandbox._closed:
            container.remove()
            return
        try:
            reply = container.request({"op": "close"}, time.monotonic() + CONTROL_TIMEOUT_S)
        except _ContainerFault as exc:
            log.warning("container %s failed on close (%s); removing it", container.short_id, exc)
            self._sandbox._discard(container)
            return
        if reply.get("ok"):
            self._sandbox._release(container)
        else:
            self._sandbox._discard(container)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._container = None  # the parent's; the next run leases one of our own
