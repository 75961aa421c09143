"""Per-kernel cgroups: the process and memory caps that bind even root.

RLIMIT_NPROC does not bind root and RLIMIT_AS does not see tmpfs or page cache, so when the
sandbox runs as root every kernel gets its own pids + memory cgroup. The groups are made below
the cgroup we already live in, so any limit placed on us still holds. Each controller is used
wherever this machine mounts it: cgroup v2 if it is enabled there, else its v1 hierarchy
(hybrid hosts have both).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import signal
import threading
import time
import weakref
from dataclasses import dataclass

from tir_envs.sandbox.base import pid_alive

log = logging.getLogger(__name__)

CONTROLLERS = ("pids", "memory")
PREFIX = "tir-sandbox-"
OPTIONAL_FILES = {"memory.memsw.limit_in_bytes", "memory.swap.max"}
"""Present only with swap accounting; every other limit file must take our value."""


@dataclass(frozen=True)
class _Controller:
    name: str
    base: str
    """Directory holding this sandbox's kernel groups."""
    v2: bool

    def limits(self, memory_bytes: int, max_pids: int) -> list[tuple[str, str]]:
        if self.name == "pids":
            return [("pids.max", str(max_pids))]
        if self.v2:
            return [("memory.max", str(memory_bytes)), ("memory.swap.max", "0")]
        return [("memory.limit_in_bytes", str(memory_bytes)),
                ("memory.memsw.limit_in_bytes", str(memory_bytes))]

    def oom_kills(self, group: str) -> int:
        if self.name != "memory":
            return 0
        events = "memory.events" if self.v2 else "memory.oom_control"
        try:
            with open(os.path.join(group, events)) as fh:
                match = re.search(r"^oom_kill (\d+)$", fh.read(), re.MULTILINE)
        except OSError:
            return 0
        return int(match.group(1)) if match else 0


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup filesystem."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if tail[0] in ("cgroup", "cgroup2"):
                found.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_groups() -> dict[str, str]:
    """controller name (or "" for v2) -> our cgroup path, from /proc/self/cgroup."""
    groups = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                groups[name] = path
    return groups


def _join(mount_root: str, mount_point: str, path: str) -> str | None:
    if not (path + "/").startswith(mount_root.rstrip("/") + "/"):
        return None  # our group is outside what this mount shows
    return mount_point + path[len(mount_root.rstrip("/")):]


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _remove_tree(path: str, attempts: int = 20) -> bool:
    """rmdir a group and its children, waiting briefly for dying processes to leave."""
    for attempt in range(attempts):
        try:
            for child in os.scandir(path):
                if child.is_dir(follow_symlinks=False):
                    _remove_tree(child.path, attempts=1)
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == attempts - 1:
                return False
            time.sleep(0.005)
    return False


class KernelCgroups:
    """Makes one pids + memory group per kernel under ``<our cgroup>/tir-sandbox-<pid>-<n>``."""

    _serial = itertools.count()

    def __init__(self, memory_bytes: int, max_pids: int):
        self.memory_bytes, self.max_pids = memory_bytes, max_pids
        self.controllers: dict[str, _Controller] = {}
        self.problems: dict[str, str] = {}
        self._names = itertools.count()
        self._busy: list[str] = []
        """Kernel groups whose last processes were still exiting; removed on a later pass."""
        self._busy_lock = threading.Lock()
        tag = f"{PREFIX}{os.getpid()}-{next(self._serial)}"
        if os.geteuid() != 0:
            self.problems = {name: "not running as root" for name in CONTROLLERS}
        else:
            mounts, own = _mounts(), _own_groups()
            for name in CONTROLLERS:
                try:
                    self.controllers[name] = self._make_base(name, tag, mounts, own)
                except OSError as exc:
                    self.problems[name] = str(exc)
        bases = list(dict.fromkeys(c.base for c in self.controllers.values()))
        self._finalizer = weakref.finalize(self, _remove_bases, bases)

    @staticmethod
    def _make_base(name: str, tag: str, mounts, own: dict[str, str]) -> _Controller:
        for root, point, fstype, options in mounts:  # v2 first, where the controller is enabled
            if fstype != "cgroup2" or "" not in own:
                continue
            ours = _join(root, point, own[""])
            if ours is None:
                continue
            with open(os.path.join(ours, "cgroup.controllers")) as fh:
                if name not in fh.read().split():
                    continue
            with open(os.path.join(ours, "cgroup.subtree_control")) as fh:
                if name not in fh.read().split():
                    _write(os.path.join(ours, "cgroup.subtree_control"), f"+{name}")
            _sweep_stale(ours)
            base = os.path.join(ours, tag)
            os.makedirs(base, exist_ok=True)
            _write(os.path.join(base, "cgroup.subtree_control"), f"+{name}")
            return _Controller(name, base, v2=True)
        for root, point, fstype, options in mounts:
            if fstype == "cgroup" and name in options and name in own:
                ours = _join(root, point, own[name])
                if ours is None:
                    continue
                _sweep_stale(ours)
                base = os.path.join(ours, tag)
                os.makedirs(base, exist_ok=True)
                return _Controller(name, base, v2=False)
        raise OSError(errno.ENOENT, f"no usable {name} cgroup controller is mounted")

    def create(self) -> KernelGroup:
        """A fresh group (one per hierarchy: v2 controllers share one) with the limits set; the
        kernel joins it itself."""
        with self._busy_lock:
            self._busy = [path for path in self._busy if not _remove_tree(path, attempts=1)]
        name = f"k{next(self._names)}"
        group = KernelGroup(self, {})
        try:
            for controller in self.controllers.values():
                path = os.path.join(controller.base, name)
                if path not in group.dirs.values():
                    os.mkdir(path)
                group.dirs[controller.name] = path
                for filename, value in controller.limits(self.memory_bytes, self.max_pids):
                    target = os.path.join(path, filename)
                    if filename not in OPTIONAL_FILES or os.path.exists(target):
                        _write(target, value)
        except OSError:
            group.remove()
            raise
        return group

    def disable(self, reason: str) -> None:
        """Stop using cgroups (e.g. the kernel may not join them) and remove ours."""
        self.close()
        self.controllers.clear()
        self.problems = {name: reason for name in CONTROLLERS}

    def close(self) -> None:
        self._finalizer()

    def abandon(self) -> None:
        """In a forked child: these groups belong to the parent; never remove them from here."""
        self._finalizer.detach()


def _remove_bases(bases: list[str]) -> None:
    for base in bases:
        if not _remove_tree(base):
            log.warning("could not remove cgroup %s (processes still inside)", base)


def _sweep_stale(parent: str) -> None:
    """Remove empty groups left by sandboxes whose process died without closing."""
    for entry in os.scandir(parent):
        match = re.fullmatch(rf"{PREFIX}(\d+)-\d+", entry.name)
        if match and not pid_alive(int(match.group(1))):
            _remove_tree(entry.path, attempts=1)


@dataclass
class KernelGroup:
    owner: KernelCgroups
    dirs: dict[str, str]
    kill_stragglers: bool = False
    """Without a pid namespace the kernel's processes can leave its process group; the cgroup
    still holds them, so release kills whatever it lists."""

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(path, "cgroup.procs") for path in dict.fromkeys(self.dirs.values())]

    @property
    def join_files(self) -> list[str]:
        """Where the (single-threaded) kernel writes "0" to move itself in. On v1 that is the
        ``tasks`` file: moving only the calling thread skips the global threadgroup lock, whose
        RCU grace period made joining cost ~10 ms; for one thread it is the same move."""
        controllers = self.owner.controllers
        files = {}
        for name, path in self.dirs.items():
            v2 = controllers[name].v2 if name in controllers else True
            files[os.path.join(path, "cgroup.procs" if v2 else "tasks")] = None
        return list(files)

    def oom_killed(self) -> bool:
        controller = self.owner.controllers.get("memory")
        return bool(controller and "memory" in self.dirs
                    and controller.oom_kills(self.dirs["memory"]) > 0)

    def kill_all(self, rounds: int = 50) -> None:
        """SIGKILL everything in the group, including processes that left the kernel's process
        group (needed only without a pid namespace, where the namespace cannot do it for us)."""
        procs = self.procs_files[:1]
        for _ in range(rounds):
            try:
                with open(procs[0]) as fh:
                    pids = [int(line) for line in fh if line.strip()]
            except (OSError, IndexError):
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    def remove(self) -> None:
        """Remove the group now if it is empty, else on a later pass (no waiting here: the
        kernel's supervisor may take a few milliseconds more to exit)."""
        for path in dict.fromkeys(self.dirs.values()):
            if not _remove_tree(path, attempts=1):
                with self.owner._busy_lock:
                    self.owner._busy.append(path)
        self.dirs = {}
