"""Docker sandbox backend: one locked-down container per live session, kept warm in a pool.

Each container runs ``sandbox_image/runner.py`` as PID 1: a zygote that imported numpy and sympy
once and forks one kernel per session. The host speaks to it over the container's attached
stdin/stdout (one hijacked HTTP connection per container, no ``exec`` per call), so a warm run
costs a couple of milliseconds on top of the code itself.

A container serves one session at a time, which is what lets the runner ``kill(-1)`` everything
(daemons the code forked included) and wipe its tmpfs when the session ends; the container then
goes back to the pool. A container that hangs or dies is removed and replaced. Containers carry
the ``tir-gym.sandbox`` label, are started with ``auto_remove`` and see their stdin close when this
process dies, so a crashed run leaves nothing behind; ``remove_leftovers`` sweeps what remains.

Build the image first: ``sandbox_image/build.sh`` (``scripts/docker_engine.sh`` also starts dockerd).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
import weakref

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

DEFAULT_IMAGE = "tir-sandbox:latest"
LABEL = "tir-gym.sandbox"
OWNER_LABEL = "tir-gym.owner"
POOL_LABEL = "tir-gym.pool"
SANDBOX_USER = "10001:10001"
RUNNER_MEMORY_MB = 256
"""Cgroup headroom above the kernel's own address-space limit: the runner and tmpfs pages."""
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(client, everything: bool = False) -> int:
    """Remove sandbox containers whose owning process on this host is gone (all with ``everything``).

    Returns how many were removed. CI calls this with ``everything=True`` before the tests.
    """
    host = socket.gethostname()
    removed = 0
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        owner_host, _, owner_pid = container.labels.get(OWNER_LABEL, "").rpartition("/")
        stale = owner_host == host and owner_pid.isdigit() and not _pid_alive(int(owner_pid))
        if everything or stale:
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

    def __init__(self, client, image: str, limits: Limits, tmpfs_mb: int, cpus: float, pool: str):
        import docker.types

        memory = f"{limits.memory_mb + RUNNER_MEMORY_MB}m"
        self.container = client.containers.create(
            image,
            # detach=False + stdin_open sets StdinOnce: when this process dies its attach closes,
            # the runner reads EOF and exits, and auto_remove deletes the container.
            detach=False,
            stdin_open=True,
            tty=False,
            user=SANDBOX_USER,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={tmpfs_mb}m,mode=1777"},
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
        except BaseException:
            self.remove()
            raise

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
            if stream == 1:
                self._out += payload
            else:
                log.warning("container %s: %s", self.short_id, payload.decode(errors="replace"))

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
            "pids_limit": bool(host_config.get("PidsLimit")),
            "rlimits": True,
        }
    )


class DockerSandbox(Sandbox):
    """A warm pool of hardened containers; each ``session()`` leases one for its lifetime.

    ``pool_size`` containers are kept started and idle so a new session costs only a kernel fork.
    More concurrent sessions than that start extra containers on demand (about a second each);
    those are removed again when their session ends and the pool is full.
    """

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        pool_size: int = 2,
        *,
        cpus: float = 1.0,
        tmpfs_mb: int = 64,
        require_isolation: bool = False,
        docker_client=None,
        **limits,
    ):
        self.limits = Limits(**limits)
        self.image = image
        self.pool_size = pool_size
        self.pool_id = uuid.uuid4().hex[:12]
        """Value of the ``tir-gym.pool`` label on this sandbox's containers."""
        self._cpus = cpus
        self._tmpfs_mb = max(tmpfs_mb, self.limits.file_size_mb)
        self._client = docker_client or _connect()
        self._check_image()
        self._lock = threading.Lock()
        self._idle: list[_Container] = []
        self._live: set[_Container] = set()
        self._refiller: threading.Thread | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _remove_all, self._live)
        remove_leftovers(self._client)

        probe = self._start_container()
        try:
            opened = probe.request(self._open_message(), time.monotonic() + START_TIMEOUT_S)
            probe.container.reload()
            self.isolation = _isolation(probe.facts, opened.get("network_filter", False), probe.container)
            probe.request({"op": "close"}, time.monotonic() + CONTROL_TIMEOUT_S)
        except _ContainerFault as exc:
            self.close()
            raise SandboxError(f"the sandbox container did not start properly: {exc}") from exc
        missing = self.isolation.missing
        if missing and require_isolation:
            self.close()
            raise SandboxError(f"isolation layers unavailable: {', '.join(missing)}")
        if missing:
            log.warning("docker sandbox runs without: %s", ", ".join(missing))
        self._release(probe)
        self._refill()

    # --- pool ------------------------------------------------------------------------------------

    def _check_image(self) -> None:
        import docker.errors

        try:
            self._client.images.get(self.image)
        except docker.errors.ImageNotFound as exc:
            raise SandboxError(
                f"docker image {self.image!r} not found; build it with sandbox_image/build.sh"
            ) from exc

    def _open_message(self) -> dict:
        return {"op": "open", "limits": dataclasses.asdict(self.limits)}

    def _start_container(self) -> _Container:
        container = _Container(
            self._client, self.image, self.limits, self._tmpfs_mb, self._cpus, self.pool_id
        )
        with self._lock:
            closed = self._closed
            if not closed:
                self._live.add(container)
        if closed:
            container.remove()
            raise SandboxError("the sandbox is closed")
        log.debug("started sandbox container %s", container.short_id)
        return container

    def _acquire(self) -> _Container:
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox is closed")
            container = self._idle.pop() if self._idle else None
        if container is None:
            container = self._start_container()
        self._refill()
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
        self._refill()

    def _refill(self) -> None:
        """Top the idle pool up in the background so the next session need not wait."""
        with self._lock:
            busy = self._refiller is not None and self._refiller.is_alive()
            if busy or self._closed or len(self._idle) >= self.pool_size:
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
            except Exception:  # noqa: BLE001 - a failed warm-up is retried on demand
                log.exception("could not start a sandbox container for the pool")
                return
            self._release(container)

    # --- public API ------------------------------------------------------------------------------

    def session(self) -> DockerSession:
        return DockerSession(self)

    def close(self) -> None:
        """Remove every container this sandbox started, leased ones included."""
        with self._lock:
            self._closed = True
            self._idle.clear()
            refiller = self._refiller
        if refiller is not None and refiller is not threading.current_thread():
            refiller.join(timeout=START_TIMEOUT_S)  # it removes what it was starting
        _remove_all(self._live)


def _connect():
    try:
        import docker
    except ImportError as exc:
        raise SandboxError("the docker backend needs the docker SDK: pip install 'tir-gym[docker]'") from exc
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
        import docker.errors

        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            return f"docker image {image!r} not found; build it with sandbox_image/build.sh"
    finally:
        client.close()
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


class DockerSession(Session):
    """One episode's kernel inside a leased container; globals persist across ``run`` calls.

    If the kernel dies (timeout, crash, OOM) the next ``run`` gets a fresh one, and says so on
    stderr; if the container itself breaks, the run reports ``infra_error`` and the session moves
    to a new container.
    """

    def __init__(self, sandbox: DockerSandbox):
        self._sandbox = sandbox
        self._lock = threading.Lock()
        self._closed = False
        self._container: _Container | None = None
        try:
            self._container = self._lease()
        except _ContainerFault as exc:
            raise SandboxError(f"could not start a session: {exc}") from exc

    def _lease(self) -> _Container:
        """A container from the pool with a fresh kernel opened in it."""
        container = self._sandbox._acquire()
        try:
            reply = container.request(self._sandbox._open_message(), time.monotonic() + CONTROL_TIMEOUT_S)
        except _ContainerFault:
            self._sandbox._discard(container)
            raise
        if not reply.get("ok"):
            self._sandbox._discard(container)
            raise _ContainerFault(f"container {container.short_id}: {reply.get('error', 'open failed')}")
        return container

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        limit = self._sandbox.limits.timeout_s if timeout is None else float(timeout)
        if not limit > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        start = time.monotonic()
        if len(code) > MAX_CODE_CHARS:
            return ExecResult(
                ExecStatus.ERROR,
                stderr=f"[sandbox] code of {len(code)} characters exceeds {MAX_CODE_CHARS}\n",
            )
        with self._lock:
            if self._closed or self._sandbox._closed:
                raise SandboxError("the session or its sandbox is closed")
            status, stdout, stderr = self._run_locked(code, limit, start)
        return ExecResult(status, stdout, stderr, time.monotonic() - start)

    def _run_locked(self, code: str, limit: float, start: float) -> tuple[ExecStatus, str, str]:
        note = ""
        if self._container is None:
            try:
                self._container = self._lease()
            except (_ContainerFault, SandboxError) as exc:
                return ExecStatus.INFRA_ERROR, "", f"[sandbox] no container available: {exc}\n"
            note = "[sandbox] a new container was started; earlier state is lost\n"
        container = self._container
        message = {
            "op": "run",
            "code": code,
            "timeout": limit,
            "max_output": self._sandbox.limits.max_output_bytes,
        }
        try:
            reply = container.request(message, start + limit + GRACE_S)
        except _ContainerHung:
            log.warning("container %s hung past its timeout; replacing it", container.short_id)
            self._drop_container()
            return ExecStatus.TIMEOUT, "", f"{note}[sandbox] timed out after {limit:g} s\n"
        except _ContainerFault as exc:
            oom = container.oom_killed()
            log.warning("container %s failed (%s); replacing it", container.short_id, exc)
            self._drop_container()
            if oom:
                return ExecStatus.MEMORY, "", f"{note}[sandbox] the container ran out of memory\n"
            return ExecStatus.INFRA_ERROR, "", f"{note}[sandbox] the container failed: {exc}\n"
        if "status" not in reply:
            self._drop_container()
            return ExecStatus.INFRA_ERROR, "", f"{note}[sandbox] {reply.get('error', 'bad reply')}\n"
        if not reply["ok"]:
            log.warning("container %s could not clean up after a kernel fault", container.short_id)
            self._drop_container()
        if reply.get("fresh_kernel") and not note:
            note = "[sandbox] the previous kernel was stopped; this cell ran in a fresh one\n"
        return ExecStatus(reply["status"]), reply["stdout"], note + reply["stderr"]

    def _drop_container(self) -> None:
        if self._container is not None:
            self._sandbox._discard(self._container)
            self._container = None

    def close(self) -> None:
        """Kill the kernel and whatever it forked, wipe scratch space, return the container."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            container, self._container = self._container, None
        if container is None:
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
