"""Grading worker processes and the ``Grader`` that owns them, plus the process-wide default.

math-verify runs in small persistent worker processes (``tir_envs.grading.worker``) with a
deadline, because sympy can hang on adversarial input and math-verify's own timeout relies on
``SIGALRM``, which only works in the main thread (not in threads or vector-env workers). A worker
that misses the deadline is killed and replaced; the verdict is then ``False``. Workers are
forgotten in forked children and stopped at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict

from tir_envs.grading import worker as _worker_module
from tir_envs.grading.normalize import Verdict, normalize_answer, string_verdict
from tir_envs.protocol import last_boxed

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Grader",
    "GraderUnavailable",
    "default_grader",
    "grade",
    "judge",
    "shutdown",
    "warm_up",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


class GraderUnavailable(RuntimeError):
    """The grading worker cannot start at all (e.g. math-verify is not installed)."""


# Loads the worker module by path so the worker does not import the tir_envs package; runs with
# the parent's sys.path so math-verify resolves exactly as it does in the parent.
_BOOT = (
    "import sys, json, importlib.util as u; sys.path[:] = json.loads(sys.argv[1]); "
    "s = u.spec_from_file_location('_tir_grading_worker', sys.argv[3]); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); m.main(int(sys.argv[2]))"
)
_WORKER_PATH = _worker_module.__file__


class _Worker:
    """One grading subprocess, spoken to in JSON lines over its stdin/stdout pipes."""

    def __init__(self, memory_limit_mb: int):
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, json.dumps(sys.path), str(memory_limit_mb), _WORKER_PATH],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C goes to the parent, not to us
        )
        self._buffer = b""
        self.ready = False

    def _readline(self, deadline: float) -> bytes | None:
        """Next line from the worker; ``None`` when the deadline passes, ``b""`` at EOF."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def wait_ready(self, timeout_s: float) -> None:
        line = self._readline(time.monotonic() + timeout_s)
        if line is None:
            raise TimeoutError(f"grading worker not ready after {timeout_s:.0f}s")
        message = json.loads(line) if line else {"error": f"exited with {self.proc.wait()}"}
        if "error" in message:
            raise GraderUnavailable(f"grading worker failed to start: {message['error']}")
        self.ready = True

    def ask(self, pred: str, gold: str, deadline: float) -> bool | None:
        """The worker's verdict, or ``None`` if it missed the deadline or died."""
        request = (json.dumps({"pred": pred, "gold": gold}) + "\n").encode()
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._readline(deadline)
        if not line:
            return None
        reply = json.loads(line)
        if "error" in reply:
            logger.debug("math-verify error on %r vs %r: %s", pred, gold, reply["error"])
        return reply["correct"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.forget()

    def forget(self) -> None:
        """Close our pipe ends without touching the process (used in a forked child)."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


_LIVE_GRADERS: weakref.WeakSet[Grader] = weakref.WeakSet()


class Grader:
    """Grades answers from any thread or process within a deadline; owns its worker processes.

    Workers start on demand (at most ``max_workers`` at once, so concurrent callers do not queue
    behind a slow sympy call) and stay warm between calls. ``close()`` stops them; a later call
    starts new ones.
    """

    def __init__(
        self,
        *,
        max_workers: int = 2,
        cache_size: int = 100_000,
        memory_limit_mb: int = 2048,
        start_timeout_s: float = 60.0,
        max_wait_s: float = 60.0,
        max_answer_chars: int = 1000,
        use_string_layer: bool = True,
    ):
        """
        Args:
            max_workers: concurrent math-verify calls; each worker is a Python process (~100 MB).
            cache_size: verdicts remembered (LRU); RL groups grade the same answers many times.
            memory_limit_mb: address-space cap per worker, so ``10^{10^{10}}`` cannot eat the host.
            start_timeout_s: bound on a worker's start (it imports sympy: ~0.5 s, more on a loaded
                machine); kept apart from the per-call deadline, which covers grading only.
            max_wait_s: bound on waiting for a free worker when more threads grade at once than
                there are workers; a deadline this long only trips on a badly overloaded host.
            max_answer_chars: longer predictions are wrong by definition (no benchmark answer is
                close) and are not parsed at all.
            use_string_layer: ``False`` sends everything to math-verify (for testing that layer).
        """
        self.max_workers = max_workers
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = start_timeout_s
        self.max_wait_s = max_wait_s
        self.max_answer_chars = max_answer_chars
        self.use_string_layer = use_string_layer
        self._cache: OrderedDict[tuple[str, str], Verdict] = OrderedDict()
        self._cache_size = cache_size
        self._init_process_state()
        _LIVE_GRADERS.add(self)

    def _init_process_state(self) -> None:
        self._cond = threading.Condition()
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []

    def judge(
        self, predicted: str | None, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> Verdict:
        """Grade ``predicted`` (a boxed answer's content); the verdict names the deciding layer."""
        if predicted is None or not str(predicted).strip():
            return Verdict(False, "empty")
        predicted, gold = str(predicted), str(gold)
        if "\\boxed" in predicted or "\\fbox" in predicted:  # a whole response was passed
            predicted = last_boxed(predicted) or predicted
        if len(predicted) > self.max_answer_chars:
            return Verdict(False, "too_long")
        key = (predicted, gold)
        with self._cond:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        pred_norm, gold_norm = normalize_answer(predicted), normalize_answer(gold)
        if not pred_norm:
            return Verdict(False, "empty")
        verdict = string_verdict(pred_norm, gold_norm) if self.use_string_layer else None
        if verdict is None:
            verdict = self._math_verify(pred_norm, gold_norm, timeout_s)
        if verdict.method not in ("timeout", "worker_error"):
            with self._cond:
                self._cache[key] = verdict
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return verdict

    def warm_up(self, workers: int = 1) -> None:
        """Start ``workers`` worker processes now and wait until they have imported sympy."""
        deadline = time.monotonic() + self.max_wait_s
        taken = [self._checkout(deadline) for _ in range(min(workers, self.max_workers))]
        taken = [worker for worker in taken if worker is not None]
        error: Exception | None = None
        for worker in taken:
            try:
                self._start(worker)
            except (TimeoutError, GraderUnavailable) as exc:
                error = error or exc
        replace = not isinstance(error, GraderUnavailable)
        for worker in taken:
            self._checkin(worker, healthy=worker.ready, replace=replace)
        if error is not None:
            raise error

    def _start(self, worker: _Worker) -> None:
        """Wait out a worker's start-up, bounded by ``start_timeout_s`` rather than the deadline."""
        if not worker.ready:
            worker.wait_ready(self.start_timeout_s)

    def _math_verify(self, pred: str, gold: str, timeout_s: float) -> Verdict:
        worker = self._checkout(time.monotonic() + self.max_wait_s)
        if worker is None:
            logger.error(
                "no grading worker free within %ss; grading %r as wrong", self.max_wait_s, pred
            )
            return Verdict(False, "timeout")
        try:
            self._start(worker)
        except TimeoutError as exc:
            logger.error("%s; grading %r as wrong", exc, pred)
            self._checkin(worker, healthy=False)
            return Verdict(False, "worker_error")
        except GraderUnavailable:
            self._checkin(worker, healthy=False, replace=False)
            raise
        correct = worker.ask(pred, gold, time.monotonic() + timeout_s)
        if correct is None:
            crashed = worker.proc.poll() is not None
            problem = (
                f"worker died (exit {worker.proc.returncode})"
                if crashed
                else f"exceeded {timeout_s}s"
            )
            logger.warning(
                "math-verify %s on %r vs %r; grading as wrong", problem, pred[:200], gold[:200]
            )
            self._checkin(worker, healthy=False)
            return Verdict(False, "worker_error" if crashed else "timeout")
        self._checkin(worker, healthy=True)
        return Verdict(correct, "math_verify")

    def _checkout(self, deadline: float) -> _Worker | None:
        """An idle worker, a new one if below ``max_workers``, or ``None`` at the deadline."""
        with self._cond:
            while True:
                while self._idle:
                    # Prefer a warm worker over a replacement that is still importing sympy.
                    warm = [i for i, idle in enumerate(self._idle) if idle.ready]
                    worker = self._idle.pop(warm[-1] if warm else -1)
                    if worker.proc.poll() is None:
                        return worker
                    logger.warning(
                        "grading worker %d died while idle; replacing it", worker.proc.pid
                    )
                    self._workers.discard(worker)
                    worker.forget()
                if len(self._workers) < self.max_workers:
                    worker = _Worker(self.memory_limit_mb)
                    self._workers.add(worker)
                    return worker
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def _checkin(self, worker: _Worker, *, healthy: bool, replace: bool = True) -> None:
        """Return a worker to the pool, or kill it and start a replacement warming up right away."""
        with self._cond:
            owned = worker in self._workers
            if healthy and owned:
                self._idle.append(worker)
            else:
                self._workers.discard(worker)
                if owned and replace:
                    replacement = _Worker(self.memory_limit_mb)
                    self._workers.add(replacement)
                    self._idle.append(replacement)
            self._cond.notify()
        if not (healthy and owned):
            worker.kill()

    def close(self) -> None:
        """Stop every worker process (busy ones too); the cache survives."""
        with self._cond:
            workers = list(self._workers)
            self._workers.clear()
            self._idle.clear()
            self._cond.notify_all()
        for worker in workers:
            worker.kill()

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for leak checks)."""
        with self._cond:
            return [worker.proc.pid for worker in self._workers]

    def _after_fork_in_child(self) -> None:
        """A forked child must not share the parent's pipes or a lock another thread may hold."""
        for worker in self._workers:
            worker.forget()
        self._init_process_state()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _forget_workers_after_fork() -> None:
    global _default_lock
    _default_lock = threading.Lock()  # another thread may have held it at fork time
    for grader in list(_LIVE_GRADERS):
        grader._after_fork_in_child()


def _close_all_graders() -> None:
    for grader in list(_LIVE_GRADERS):
        grader.close()


os.register_at_fork(after_in_child=_forget_workers_after_fork)
atexit.register(_close_all_graders)

_default_grader: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The process-wide grader behind ``grade``; created on first use."""
    global _default_grader
    with _default_lock:
        if _default_grader is None:
            _default_grader = Grader()
        return _default_grader


def judge(predicted: str | None, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """Like ``grade`` but also says which layer decided."""
    return default_grader().judge(predicted, gold, timeout_s=timeout_s)


def grade(predicted: str | None, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``predicted`` (the content of the model's last ``\\boxed{}``) equals ``gold``.

    Safe from any thread or vector-env worker. The math-verify work is cut off after
    ``timeout_s`` (verdict ``False``). Two waits are bounded separately (see ``Grader``): a worker's
    start-up (~0.5 s, on first use or right after a timeout replaced one) and, only when more
    threads grade at once than there are workers, the wait for a free worker.
    """
    return judge(predicted, gold, timeout_s=timeout_s).correct


def warm_up() -> None:
    """Start the default grader's worker now rather than on the first hard answer."""
    default_grader().warm_up()


def shutdown() -> None:
    """Stop the default grader's worker processes (they restart on the next call)."""
    if _default_grader is not None:
        _default_grader.close()
