"""In-container kernel server for tir-gym's docker sandbox backend.

Runs as PID 1 of a locked-down container, so it reaps every orphan and is immune to signals sent
from inside (the kernel ignores SIGKILL to a namespace's init from its own namespace). It imports
numpy and sympy once, then forks one fresh Python kernel per session, like a zygote.

The host talks to it over the container's attached stdin/stdout with length-prefixed JSON frames:
8 hex digits of length, then ASCII-only JSON. Pure ASCII matters: docker scans attached stdin for
a detach key sequence, and the host sets that to NUL, a byte these frames never contain.
One request, one reply:

  {"op": "hello"}                      -> facts about the isolation, measured from inside
  {"op": "open", "limits": {...}}      -> a fresh kernel for a new session
  {"op": "run", "code", "timeout"}     -> {"status", "stdout", "stderr", "ok"}
  {"op": "close"}                      -> kill every process but this one, wipe scratch space

A container hosts one session at a time, so on close or after a kernel fault everything except
PID 1 is killed with kill(-1), daemons the code forked included. How the kernel runs a cell
(capped output, statuses, rlimits, stray processes) is ``cell.py`` from tir_envs/sandbox/, copied
beside this file: the local backend's kernel runs cells with the same module.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import stat
import struct
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ``python -I`` leaves it off
import cell  # noqa: E402  (how cells run, shared with the local kernel; copied beside this file)

del sys.path[0]

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # BLAS thread pools would eat the pids limit and memory; set before import

import fractions  # noqa: E402,F401  (warm imports: every kernel forks with them loaded)
import itertools  # noqa: E402,F401
import math  # noqa: E402,F401

import numpy  # noqa: E402,F401
import sympy  # noqa: E402,F401

WORK_DIR = "/tmp"
SCRATCH_DIRS = ("/tmp", "/dev/shm", "/dev/mqueue")
KERNEL_CTL_FD = 3
SAVED_STDOUT_FD, SAVED_STDERR_FD = 250, 251
"""Private copies of the kernel's output pipes, so a cell that closes fd 1 or 2 breaks only itself."""
MAX_FRAME = 64 * 1024 * 1024
DRAIN_CHUNK = 1024 * 1024
MEMORY_POLL_S = 0.02
OUTPUT_KILL_FACTOR = 16
"""A run that keeps printing past this many times the output limit is killed, not just cut."""
KERNEL_START_S = 10.0
KERNEL_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORK_DIR,
    "TMPDIR": WORK_DIR,
    "LANG": "C.UTF-8",
    "MPLCONFIGDIR": WORK_DIR,
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
IPC_RMID = 0


# --- framing -------------------------------------------------------------------------------------


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(fd: int) -> dict | None:
    """Read one frame; None on EOF (the peer is gone)."""
    header = _read_exact(fd, 8)
    if header is None:
        return None
    size = int(header, 16)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    body = _read_exact(fd, size)
    return None if body is None else json.loads(body)


def send_frame(fd: int, message: dict) -> None:
    body = json.dumps(message, ensure_ascii=True).encode("ascii")
    data = memoryview(b"%08x" % len(body) + body)
    while data:
        data = data[os.write(fd, data) :]


# --- isolation helpers ---------------------------------------------------------------------------


def _network_filter() -> bytes:
    """A seccomp BPF program: socket() for IP and packet families fails with EPERM.

    network_mode=none leaves a working loopback inside the container; this closes it too, while
    AF_UNIX (pipes, multiprocessing) keeps working.
    """
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    allow, errno_eperm = 0x7FFF0000, 0x00050001
    arch, socket_nr = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}[os.uname().machine]
    af_inet, af_inet6, af_packet = 2, 10, 17
    program = [
        (ld_abs, 0, 0, 4),  # arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, errno_eperm),  # a foreign ABI (x32, i386): refuse rather than guess numbers
        (ld_abs, 0, 0, 0),  # syscall nr
        (jeq, 0, 4, socket_nr),
        (ld_abs, 0, 0, 16),  # low word of args[0]: the address family
        (jeq, 3, 0, af_inet),
        (jeq, 2, 0, af_inet6),
        (jeq, 1, 0, af_packet),
        (ret, 0, 0, allow),
        (ret, 0, 0, errno_eperm),
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in program)


def install_network_filter() -> bool:
    """Install the seccomp socket filter in this process; False where the kernel refuses."""

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    try:
        code = _network_filter()
    except KeyError:
        return False
    prog = SockFprog(len(code) // 8, code)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0


def _oom_kills() -> int | None:
    """The container cgroup's OOM-kill counter (v1 or v2), to tell an OOM kill from other deaths."""
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return None


def memory_in_use() -> int | None:
    """Bytes of the container's memory that reclaim cannot free: anonymous pages and tmpfs files.

    The cgroup's own limit also counts the image's file pages (python, numpy), so a kernel close
    to it thrashes in reclaim for a second before the OOM killer acts; watching this number lets
    the runner enforce ``memory_mb`` promptly and leave the cgroup limit as a backstop.
    """
    for path, keys in (
        ("/sys/fs/cgroup/memory/memory.stat", ("rss", "shmem")),
        ("/sys/fs/cgroup/memory.stat", ("anon", "shmem")),
    ):
        try:
            with open(path) as f:
                stats = dict(line.split() for line in f)
        except OSError:
            continue
        return sum(int(stats.get(key, 0)) for key in keys)
    return None


def isolation_facts() -> dict:
    """What this container actually enforces, measured from inside rather than assumed."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            status[name] = value.strip()
    mounts = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _, target, fstype, options = line.split()[:4]
            mounts[target] = (fstype, options.split(","))
    return {
        "uid": os.getuid(),
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "seccomp": status.get("Seccomp") == "2",
        "cap_eff_zero": int(status.get("CapEff", "1"), 16) == 0,
        "read_only_rootfs": "ro" in mounts.get("/", ("", []))[1],
        "tmp_tmpfs": mounts.get("/tmp", ("", []))[0] == "tmpfs",
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "memory_watch": memory_in_use() is not None,
    }


# --- process control and cleanup -----------------------------------------------------------------


def reap() -> None:
    """Collect every exited child: as PID 1 all orphans land here."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _other_pids() -> list[int]:
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def kill_all(deadline_s: float = 5.0) -> bool:
    """SIGKILL every process in the container except this one; True once none is left."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap()
        if not _other_pids():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.001)


def _remove_tree(path: str) -> None:
    """Delete a file or directory tree, first giving back any permission the code took away."""
    try:
        is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return
    if not is_dir:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    try:
        os.chmod(path, 0o700)
        names = os.listdir(path)
    except OSError:
        names = []
    for name in names:
        _remove_tree(os.path.join(path, name))
    try:
        os.rmdir(path)
    except OSError:
        pass


def _remove_sysv_ipc() -> None:
    """SysV shared memory, queues and semaphores outlive their creators; drop them between sessions."""
    for kind, ctl in (("shm", _libc.shmctl), ("msg", _libc.msgctl), ("sem", _libc.semctl)):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            ipc_id = int(row.split()[1])
            if kind == "sem":
                ctl(ipc_id, 0, IPC_RMID)
            else:
                ctl(ipc_id, IPC_RMID, None)


def wipe_scratch() -> bool:
    """Empty /tmp, /dev/shm and SysV IPC for the next session; True if nothing is left."""
    left = False
    for root in SCRATCH_DIRS:
        try:
            for name in os.listdir(root):
                _remove_tree(os.path.join(root, name))
            left = left or bool(os.listdir(root))
        except OSError:
            continue  # e.g. no /dev/mqueue in this container
    _remove_sysv_ipc()
    return not left


# --- the kernel (a forked child) -----------------------------------------------------------------


def _kernel_setup(limits: dict, out_w: int, err_w: int, ctl: int) -> bool:
    """Confine the freshly forked child; returns whether the network filter is active."""
    os.setsid()
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # the OOM killer takes a kernel, never the runner
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(ctl, KERNEL_CTL_FD)
    os.dup2(out_w, SAVED_STDOUT_FD)  # before RLIMIT_NOFILE, which may be lower than these
    os.dup2(err_w, SAVED_STDERR_FD)
    os.closerange(KERNEL_CTL_FD + 1, SAVED_STDOUT_FD)
    os.closerange(SAVED_STDERR_FD + 1, 65536)
    os.environ.clear()
    os.environ.update(KERNEL_ENV)
    os.chdir(WORK_DIR)
    refused = cell.set_limits(
        address_space_mb=limits["address_space_mb"],
        cpu_s=limits["cpu_s"],
        file_size_mb=limits["file_size_mb"],
        max_open_files=limits["max_open_files"],
    )
    if refused:  # the host reports rlimits as active: fail rather than run without them
        raise RuntimeError(f"rlimits refused: {'; '.join(refused)}")
    # Orphans of what the cells start come back to the kernel, which kills and reaps them.
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # its own children may inspect it; PID 1 stays closed
    return install_network_filter()


def kernel_main(limits: dict, out_w: int, err_w: int, ctl: int) -> None:
    """Serve cells until the control socket closes; globals persist across cells."""
    network_filter = _kernel_setup(limits, out_w, err_w, ctl)
    streams = cell.Streams(SAVED_STDOUT_FD, SAVED_STDERR_FD, limits["max_output_bytes"])
    # kill(-1) reaches all but PID 1 and this kernel: the container holds only this session
    cells = cell.CellRunner(streams, kill_strays=True)
    send_frame(KERNEL_CTL_FD, {"ready": True, "network_filter": network_filter})
    while True:
        request = recv_frame(KERNEL_CTL_FD)
        if request is None:
            os._exit(0)
        send_frame(KERNEL_CTL_FD, {"status": cells.run(request["code"])})


class Kernel:
    """The runner's handle on one forked kernel: its control socket and output pipes."""

    def __init__(self, limits: dict):
        import socket

        ctl_parent, ctl_child = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                ctl_parent.close()
                kernel_main(limits, out_w, err_w, ctl_child.fileno())
            except BaseException:  # noqa: BLE001 - report whatever broke the setup, then die
                traceback.print_exc()
            finally:
                os._exit(70)
        ctl_child.close()
        os.close(out_w)
        os.close(err_w)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        self.pid = pid
        # Readable once the kernel exits. Its pipes and socket cannot say so: a daemon it forked
        # may hold copies of them.
        self.pidfd = os.pidfd_open(pid)
        self.ctl = ctl_parent
        self.out_r, self.err_r = out_r, err_r
        ready, _, _ = select.select([self.ctl], [], [], KERNEL_START_S)
        hello = recv_frame(self.ctl.fileno()) if ready else None
        if hello is None:
            detail = self._drain(self.err_r).decode("utf-8", "replace")
            self.close()
            raise RuntimeError(f"the kernel did not start: {detail}")
        self.network_filter = hello["network_filter"]
        self.memory_baseline = memory_in_use()  # the runner and an idle kernel

    def close(self) -> None:
        self.ctl.close()
        for fd in (self.out_r, self.err_r, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def exited(self) -> bool:
        """Whether the kernel has died since its last reply (e.g. a thread of it called _exit)."""
        return bool(select.select([self.pidfd], [], [], 0)[0])

    @staticmethod
    def _drain(fd: int, limit: int = DRAIN_CHUNK) -> bytes:
        """Whatever the pipe holds right now, at most ``limit`` bytes (never blocks)."""
        data = bytearray()
        while len(data) < limit:
            try:
                chunk = os.read(fd, min(65536, limit - len(data)))
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def _death(self, oom_before: int | None, limits: dict) -> tuple[str, str]:
        """Status and message for a kernel that vanished mid-cell (read as the local backend does)."""
        try:
            _, wait_status, usage = os.wait4(self.pid, 0)
        except ChildProcessError:
            return "infra_error", "SandboxError: the kernel vanished"
        oom_after = _oom_kills()
        oom = oom_after > oom_before if oom_before is not None and oom_after is not None else None
        return cell.death_status(
            wait_status,
            usage.ru_utime + usage.ru_stime,
            memory_mb=limits["memory_mb"],
            cpu_s=limits["cpu_s"],
            oom_killed=oom,
        )

    def run(self, code: str, timeout: float, limits: dict) -> tuple[dict, bool]:
        """Run one cell; returns the reply and whether the kernel survived."""
        max_output = limits["max_output_bytes"]
        for fd in (self.out_r, self.err_r):
            self._drain(fd, MAX_FRAME)  # what a background thread wrote between cells
        oom_before = _oom_kills()
        start = time.monotonic()
        deadline = start + timeout
        try:
            send_frame(self.ctl.fileno(), {"code": code})
        except BrokenPipeError:
            pass  # it died right now; the pidfd below says how
        buffers = {self.out_r: bytearray(), self.err_r: bytearray()}
        seen = 0
        status, note, alive = None, "", True
        memory_cap = None
        if self.memory_baseline is not None:
            memory_cap = self.memory_baseline + limits["memory_mb"] * 1024 * 1024
        while status is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status, alive = "timeout", False
                note = (
                    f"TimeoutError: the cell ran longer than {timeout:g} s and was killed "
                    "with everything it started"
                )
                break
            if memory_cap is not None and memory_in_use() > memory_cap:
                status, alive = "memory", False
                note = cell.memory_note(limits["memory_mb"])
                break
            watched = [self.ctl, self.out_r, self.err_r, self.pidfd]
            wait = remaining if memory_cap is None else min(remaining, MEMORY_POLL_S)
            ready, _, _ = select.select(watched, [], [], wait)
            for fd in (self.out_r, self.err_r):
                if fd in ready:
                    chunk = self._drain(fd)
                    seen += len(chunk)
                    buffers[fd] += chunk[: max(0, max_output + 1 - len(buffers[fd]))]
            if seen > OUTPUT_KILL_FACTOR * max_output:
                status, alive = "output_limit", False
                note = (
                    f"OutputLimit: the cell kept writing past {max_output} bytes and was killed "
                    "with everything it started"
                )
                break
            reply = recv_frame(self.ctl.fileno()) if self.ctl in ready else None
            if reply is not None:
                status = reply["status"]
            elif self.ctl in ready or self.pidfd in ready:
                (status, note), alive = self._death(oom_before, limits), False
        if alive:
            for fd in (self.out_r, self.err_r):
                buffers[fd] += self._drain(fd)[: max(0, max_output + 1 - len(buffers[fd]))]
        stdout, stderr = bytes(buffers[self.out_r]), bytes(buffers[self.err_r])
        if len(stdout) > max_output or len(stderr) > max_output:
            status = "output_limit" if status == "ok" else status
            stdout, stderr = stdout[:max_output], stderr[:max_output]
        text = stderr.decode("utf-8", "replace")
        if not alive:
            note += "\nThe kernel restarts on the next run: variables from earlier runs are gone."
        if note:
            text = f"{text}\n{note.strip()}\n" if text else f"{note.strip()}\n"
        return {
            "status": status,
            "stdout": stdout.decode("utf-8", "replace"),
            "stderr": text,
        }, alive


# --- the server loop -----------------------------------------------------------------------------


def serve(proto_in: int, proto_out: int) -> None:
    kernel: Kernel | None = None
    limits: dict = {}

    def end_kernel() -> bool:
        nonlocal kernel
        if kernel is not None:
            kernel.close()
            kernel = None
        return kill_all()

    while True:
        request = recv_frame(proto_in)
        if request is None:
            end_kernel()
            return
        op = request.get("op")
        try:
            if op == "hello":
                reply = {"ok": True, "facts": isolation_facts()}
            elif op == "open":
                clean = end_kernel() and wipe_scratch()
                limits = request["limits"]
                kernel = Kernel(limits)
                reply = {"ok": clean, "network_filter": kernel.network_filter}
            elif op == "run":
                if kernel is not None and kernel.exited():
                    end_kernel()
                if kernel is None:
                    kill_all()
                    kernel = Kernel(limits)
                reply, alive = kernel.run(request["code"], request["timeout"], limits)
                reply["ok"] = True if alive else end_kernel()
            elif op == "close":
                clean = end_kernel()
                reply = {"ok": wipe_scratch() and clean}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - tell the host; it replaces this container
            traceback.print_exc()
            reply = {"ok": False, "error": f"runner failure: {exc!r}"}
        reap()
        send_frame(proto_out, reply)


def main() -> None:
    if os.getpid() != 1:
        sys.exit("runner.py must be PID 1 of its own container: it kills every other process")
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace of, or /proc/1/fd access to, the runner
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print in here must never corrupt the protocol stream
    wipe_scratch()
    serve(proto_in, proto_out)


if __name__ == "__main__":
    main()
