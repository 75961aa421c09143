"""The far side of the local sandbox: a zygote that forks isolated, stateful Python kernels.

``LocalSandbox`` runs this file as a script (``python -I _kernel.py FD``) with a scrubbed
environment. It imports the heavy modules once, then for every session request forks::

    zygote ── A, the supervisor (host pid namespace): joins the kernel's cgroups, builds the
               │  filesystem view (as real root when we are root), drops to an unprivileged uid,
               │  unshares user/mount/net/pid/ipc namespaces, hands the parent a pidfd of K and
               │  the two output memfds, then waits: reports K's death, or kills K if the parent
               │  hangs up.
               └─ K, the kernel (pid 1 of the new pid namespace): its own /proc, no capabilities,
                  rlimits, scrubbed env; runs code cells in one globals dict. Because K is the
                  namespace's init, one SIGKILL to K takes down everything the code forked.

Only the standard library is used (plus the modules it preloads, and ``cell.py`` beside it, which
runs the code cells as the docker runner does), so the file is importable by the parent for the
wire protocol and runnable with nothing from the project on ``sys.path``.
Linux only; every isolation step is optional and reported, so the parent can say which layers
are really active.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import json
import os
import platform
import select
import signal
import socket
import struct
import sys
import traceback

if __package__:  # imported by local.py, for the wire protocol
    from tir_envs.sandbox import cell
else:  # run by path: ``python -I`` keeps this file's directory off sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cell
    del sys.path[0]

# --------------------------------------------------------------------------------------------
# Wire protocol, shared with local.py: frames of (u32 payload length, u8 kind) + payload.
# --------------------------------------------------------------------------------------------

HEADER = struct.Struct("<IB")
MAX_FRAME = 1 << 20
"""Largest frame the parent accepts from a kernel (kernel frames are tiny; code is sandboxed)."""

SPAWN = 1  # parent -> zygote: JSON kernel config, with the kernel's socket as SCM_RIGHTS
RUN = 2  # parent -> kernel: code, UTF-8 with surrogates passed through
READY_ZYGOTE = 3  # zygote -> parent: JSON {"preloaded": [...], "missing": [...]}
PIDFD = 4  # A -> parent: K's host pid (u32) + fds [pidfd of K, stdout memfd, stderr memfd]
READY = 5  # K -> parent: JSON {"layers": {...}}
RESULT = 6  # K -> parent: one status byte (index into STATUSES)
DIED = 7  # A -> parent: K's wait status (i32) and CPU seconds used (f64)
SETUP_FAILED = 8  # A or K -> parent: JSON {"layer": name, "error": text}

DIED_PAYLOAD = struct.Struct("<id")
STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "infra_error")
OK, ERROR, MEMORY, OUTPUT_LIMIT = 0, 1, 3, 4

PRELOAD = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
           "statistics", "random", "re", "json", "numpy", "sympy")
THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                                     "VECLIB_MAXIMUM_THREADS")}
KERNEL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
              "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **THREAD_ENV}


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"", fds: list[int] = ()) -> None:
    data = HEADER.pack(len(payload), kind) + payload
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame_blocking(sock: socket.socket, with_fds: bool = False):
    """(kind, payload, fds) or None on EOF; used on the trusted direction (parent -> here)."""
    fds: list[int] = []
    if with_fds:
        head, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, 4)
        if not head:
            return None
        if len(head) < HEADER.size:
            rest = _recv_exact(sock, HEADER.size - len(head))
            if rest is None:
                return None
            head += rest
    else:
        head = _recv_exact(sock, HEADER.size)
        if head is None:
            return None
    length, kind = HEADER.unpack(head)
    payload = _recv_exact(sock, length) if length else b""
    if payload is None:
        return None
    return kind, payload, fds


# --------------------------------------------------------------------------------------------
# Thin ctypes layer over the Linux calls Python 3.11 lacks (unshare, mount, pivot_root, capset).
# --------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYSCALLS = {  # only the calls whose numbers differ between architectures
    "x86_64": {"pivot_root": 155, "capset": 126},
    "aarch64": {"pivot_root": 41, "capset": 91},
}
SYS_MOUNT_SETATTR = 442  # same number on every architecture (added after the syscall unification)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall_number(name: str) -> int:
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"{name}: unsupported architecture {platform.machine()}")
    return numbers[name]


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


def umount_detach(target: str) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(_syscall_number("pivot_root")), new_root.encode(),
                         put_old.encode()), "pivot_root")


def make_readonly(path: str, recursive: bool) -> None:
    """Set read-only/nosuid/nodev on a mount (and, if asked, every mount below it)."""
    attr = struct.pack("<QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    flags = AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                         ctypes.c_uint(flags), buf, ctypes.c_size_t(len(attr))),
           f"mount_setattr {path}")


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl {option}")


def drop_capabilities() -> None:
    """Empty the effective/permitted/inheritable/ambient sets and forbid regaining any."""
    header = struct.pack("<Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # two empty {effective, permitted, inheritable} triples
    _check(_libc.syscall(ctypes.c_long(_syscall_number("capset")), header, data), "capset")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# --------------------------------------------------------------------------------------------
# Zygote
# --------------------------------------------------------------------------------------------


def preload() -> dict:
    loaded, missing = [], []
    for name in PRELOAD:
        try:
            __import__(name)
            loaded.append(name)
        except Exception as exc:  # a missing optional module must not kill the sandbox
            missing.append(f"{name}: {exc!r}")
    if "sympy" in sys.modules:  # pay sympy's lazy imports and caches once, not in every kernel
        import sympy

        x = sympy.Symbol("x")
        sympy.factor(x**2 - 1), sympy.solve(x**2 - 4, x), sympy.simplify(sympy.sin(x) ** 2 + 1)
    return {"preloaded": loaded, "missing": missing}


def interpreter_dirs() -> list[str]:
    """Directories the kernel's interpreter needs, beyond /usr and /etc (e.g. a venv, pyenv)."""
    import site
    import sysconfig

    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  *site.getsitepackages(), sysconfig.get_paths()["stdlib"],
                  os.path.dirname(os.path.realpath(sys.executable))}
    roots = sorted({os.path.realpath(p) for p in candidates if os.path.isdir(p)})
    covered = ("/usr", "/etc")
    kept: list[str] = []
    for root in roots:
        if root == "/" or any(root == c or root.startswith(c + "/") for c in covered):
            continue
        if any(root.startswith(k.rstrip("/") + "/") for k in kept):
            continue
        kept.append(root)
    return kept


def zygote_main(control_fd: int) -> None:
    for name, value in THREAD_ENV.items():  # before numpy: one process, one thread
        os.environ.setdefault(name, value)
    control = socket.socket(fileno=control_fd)
    report = preload()
    roots = interpreter_dirs()
    gc.freeze()  # keep the preloaded heap out of kernels' GC passes: fewer copy-on-write faults
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children for us
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned namespace inits come back here to be reaped
    send_frame(control, READY_ZYGOTE, json.dumps(report).encode())
    while True:
        frame = recv_frame_blocking(control, with_fds=True)
        if frame is None:
            return  # the parent closed the sandbox (or died): nothing left to serve
        _kind, payload, fds = frame
        if not fds:
            continue
        config = json.loads(payload)
        config["interpreter_dirs"] = roots
        if os.fork() == 0:
            try:
                _supervisor_stage(fds[0], control_fd, config)
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# A: the supervisor. Host-side setup, then hand the kernel to the parent and watch it.
# --------------------------------------------------------------------------------------------


class SetupFailed(Exception):
    def __init__(self, layer: str, error: BaseException | str):
        super().__init__(f"{layer}: {error}")
        self.layer, self.error = layer, str(error)


def _reporting_failures(sock: socket.socket, stage, *args) -> None:
    """Run a setup stage; tell the parent which layer failed (or the traceback of a bug)."""
    try:
        stage(sock, *args)
    except SetupFailed as failure:
        report = {"layer": failure.layer, "error": failure.error}
    except BaseException:
        report = {"layer": "internal", "error": traceback.format_exc()}
    else:
        return
    try:
        send_frame(sock, SETUP_FAILED, json.dumps(report).encode())
    except OSError:
        pass


def _step(layer: str, fn, *args) -> None:
    try:
        fn(*args)
    except OSError as exc:
        raise SetupFailed(layer, exc) from None


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _drop_to(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _supervisor_stage(sock_fd: int, control_fd: int, config: dict) -> None:
    os.close(control_fd)  # the kernel must never be able to ask the zygote for anything
    os.closerange(3, sock_fd)
    os.closerange(sock_fd + 1, os.sysconf("SC_OPEN_MAX"))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _reporting_failures(socket.socket(fileno=sock_fd), _isolate_and_fork, config)


def _isolate_and_fork(sock: socket.socket, config: dict) -> None:
    layers = config["layers"]
    for join_file in config["cgroup_join"]:  # "0": this thread; we are single-threaded
        _step("cgroup", _write, join_file, "0")
    privileged = os.geteuid() == 0
    if layers["mount_ns"] and privileged:  # as real root: any host path can be bound in
        _isolate_filesystem(config)
    if layers["user_ns"]:
        if privileged:  # map the unprivileged uid, never host root
            _step("unprivileged", _drop_to, config["uid"])
            _step("unprivileged", prctl, PR_SET_DUMPABLE, 1)  # keep /proc/self/uid_map ours
        uid, gid = os.geteuid(), os.getegid()
        _step("user_ns", unshare, CLONE_NEWUSER)
        _step("user_ns", _write, "/proc/self/setgroups", "deny")
        _step("user_ns", _write, "/proc/self/uid_map", f"{uid} {uid} 1")
        _step("user_ns", _write, "/proc/self/gid_map", f"{gid} {gid} 1")
        if layers["mount_ns"] and privileged:  # a copy owned by the new user namespace, so K
            _step("mount_ns", unshare, CLONE_NEWNS)  # may mount its /proc; the rest is locked
    if layers["mount_ns"] and not privileged:
        _isolate_filesystem(config)
    for layer, flag in (("net_ns", CLONE_NEWNET), ("pid_ns", CLONE_NEWPID),
                        ("ipc_ns", CLONE_NEWIPC)):
        if layers[layer]:
            _step(layer, unshare, flag)
    out_fd = os.memfd_create("stdout")
    err_fd = os.memfd_create("stderr")
    for fd in (out_fd, err_fd):  # O_APPEND: truncating to 0 rewinds every writer at once
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    go_read, go_write = os.pipe()
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_write)  # before the fork: no SIGCHLD can be missed
    signal.signal(signal.SIGCHLD, lambda *_: None)
    kernel_pid = os.fork()
    if kernel_pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (go_write, wake_read, wake_write):
            os.close(fd)
        os.read(go_read, 1)  # the parent must hear about us (PIDFD) before anything else
        os.close(go_read)
        try:
            _reporting_failures(sock, _kernel_stage, config, out_fd, err_fd)
        finally:
            os._exit(1)
    os.close(go_read)
    pidfd = os.pidfd_open(kernel_pid)
    send_frame(sock, PIDFD, struct.pack("<I", kernel_pid), [pidfd, out_fd, err_fd])
    for fd in (pidfd, out_fd, err_fd):
        os.close(fd)
    os.write(go_write, b"!")
    os.close(go_write)
    if os.geteuid() != 0:  # (still root only without a user namespace: then K drops)
        drop_capabilities()
    _supervise(sock, kernel_pid, wake_read)


def _isolate_filesystem(config: dict) -> None:
    _step("mount_ns", unshare, CLONE_NEWNS)
    _step("mount_ns", mount, None, "/", None, MS_REC | MS_PRIVATE)  # nothing leaks to the host
    if config["layers"]["filesystem_view"]:
        _step("filesystem_view", build_filesystem_view, config)


def _supervise(sock: socket.socket, kernel_pid: int, wake_fd: int) -> None:
    """Report the kernel's death; take it down if the parent closes the session or dies.

    The kernel called setsid(), so its process group holds what it forked; without a pid
    namespace that group is the best handle we have on them.
    """
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    poller.register(wake_fd, select.POLLIN)
    while True:
        for fd, _event in poller.poll():
            if fd == sock.fileno():
                _kill_group(kernel_pid)
                os._exit(0)
            try:
                while os.read(wake_fd, 512):
                    pass
            except BlockingIOError:
                pass
        try:  # WNOWAIT: the zombie keeps its pid (and group id) from being reused ...
            died = os.waitid(os.P_PID, kernel_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            os._exit(0)
        if died is not None:
            _kill_group(kernel_pid)  # ... until its stragglers are signalled
            _, status, usage = os.wait4(kernel_pid, 0)
            cpu_s = usage.ru_utime + usage.ru_stime
            try:
                send_frame(sock, DIED, DIED_PAYLOAD.pack(status, cpu_s))
            except OSError:
                pass
            os._exit(0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# The filesystem view
# --------------------------------------------------------------------------------------------

NEW_ROOT = "/tmp"  # only a mount point inside our private mount namespace
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "shm": "/tmp"}
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _bind_readonly(source: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    mount(source, target, None, MS_BIND | MS_REC)
    make_readonly(target, recursive=True)


def build_filesystem_view(config: dict) -> None:
    """An allow-list root: system dirs and the interpreter read-only, a private tmpfs /tmp.

    Everything else of the host (home directories, the project tree, /var, /run with its
    sockets, /sys) simply does not exist in the kernel's view. /proc starts as the host's and
    is covered by the pid namespace's own in K (the kernel only allows a new proc mount where a
    full one is already visible).
    """
    # Hold every directory to bind before the new root's tmpfs goes over NEW_ROOT: a venv or a
    # checkout under /tmp would be hidden by it, so binds go through these descriptors.
    links = {path: os.readlink(path) for path in SYSTEM_DIRS if os.path.islink(path)}
    binds = [path for path in SYSTEM_DIRS if path not in links and os.path.isdir(path)]
    binds += config["interpreter_dirs"]
    held = {path: os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for path in binds}
    try:
        mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        # The private /tmp goes first, so an interpreter that lives under /tmp is bound inside it.
        os.mkdir(NEW_ROOT + "/tmp")
        mount("tmpfs", NEW_ROOT + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
              f"size={config['tmp_size_mb']}m,mode=1777")
        for path, target in links.items():
            os.symlink(target, NEW_ROOT + path)
        for path, fd in held.items():
            _bind_readonly(f"/proc/self/fd/{fd}", NEW_ROOT + path)
    finally:
        for fd in held.values():
            os.close(fd)
    dev = NEW_ROOT + "/dev"
    os.mkdir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEVICES:
        open(f"{dev}/{name}", "w").close()
        mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(NEW_ROOT + "/proc")
    mount("/proc", NEW_ROOT + "/proc", None, MS_BIND | MS_REC)
    os.chdir(NEW_ROOT)
    pivot_root(".", ".")  # the old root now sits on top of the new one ...
    umount_detach(".")  # ... and is detached for good
    os.chdir("/")
    make_readonly("/", recursive=False)


# --------------------------------------------------------------------------------------------
# K: the kernel.
# --------------------------------------------------------------------------------------------


def _kernel_stage(sock: socket.socket, config: dict, out_fd: int, err_fd: int) -> None:
    layers = config["layers"]
    os.setsid()
    if layers["mount_ns"] and layers["pid_ns"]:  # /proc shows only this namespace
        _step("pid_ns", mount, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.geteuid() == 0:  # root without a user namespace: drop to the sandbox uid here
        _step("unprivileged", _drop_to, config["uid"])
    _step("unprivileged", drop_capabilities)
    _step("unprivileged", prctl, PR_SET_DUMPABLE, 0)  # no core dumps, no ptrace by peers
    os.environ.clear()
    os.environ.update(KERNEL_ENV)
    try:
        os.chdir("/tmp" if config["layers"]["filesystem_view"] else config["tmp_dir"])
    except OSError as exc:
        raise SetupFailed("private_tmp", exc) from None
    limits = config["limits"]
    streams = cell.Streams(out_fd, err_fd, limits["max_output_bytes"])
    rlimit_failures = cell.set_limits(
        address_space_mb=limits["memory_mb"], cpu_s=limits["cpu_s"],
        file_size_mb=limits["file_size_mb"], max_open_files=limits["max_open_files"],
        # RLIMIT_NPROC counts per (user namespace, uid): per kernel only in its own namespace
        max_processes=limits["max_pids"] if layers["user_ns"] else None)
    report = {"layers": {"rlimits": not rlimit_failures, "scrubbed_env": True},
              "rlimit_failures": rlimit_failures}
    send_frame(sock, READY, json.dumps(report).encode())
    # kill(-1) reaches only the cells' processes where the kernel is its pid namespace's init
    _serve(sock, cell.CellRunner(streams, kill_strays=layers["pid_ns"]))


def _serve(sock: socket.socket, cells: cell.CellRunner) -> None:
    """Run cells, one request, one reply, until the parent hangs up."""
    while True:
        frame = recv_frame_blocking(sock)
        if frame is None:
            os._exit(0)
        kind, payload, _ = frame
        if kind != RUN:
            os._exit(2)
        status = cells.run(payload.decode("utf-8", "surrogatepass"))
        send_frame(sock, RESULT, bytes([STATUSES.index(status)]))


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]))
