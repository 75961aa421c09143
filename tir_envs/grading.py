"""Answer grading: is a model's boxed answer equivalent to the gold answer?

``grade(predicted, gold)`` decides in layers, cheapest first, so the common cases never touch sympy:

1. **String layer** (in process, microseconds): both sides are normalized (``normalize_answer``);
   equal strings, exact numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands commas,
   leading zeros, scientific notation) and text answers (``\\text{Evelyn}``, choice letters) are
   decided here.
2. **math-verify layer**: everything else goes to ``math_verify.parse`` + ``verify`` plus a few
   rules of our own (column vector == tuple, percent signs). It runs in a small persistent worker
   process with a deadline, because sympy can hang on adversarial input and math-verify's own
   timeout relies on ``SIGALRM``, which only works in the main thread (not in threads or
   vector-env workers). A worker that misses the deadline is killed and replaced; the verdict is
   then ``False`` (the string layer already failed to match).
3. Verdicts are cached (LRU), except timeouts and worker failures.

Equivalence policy (what counts as the same answer):

- Numbers compare by value: ``5.0 == 5``, ``033 == 33``, ``1,000 == 1000``, ``1e3 == 1000``,
  ``0.5 == 1/2 == \\frac12``. A decimal matches a non-terminating exact value only to math-verify's
  6 decimal places: ``0.333333 == 1/3`` but ``0.333 != 1/3`` and ``3.14 != \\pi``.
- Units, degrees, dollar signs and LaTeX spacing are ignored: ``90^\\circ == 90``,
  ``864 \\mbox{ inches}^2 == 864``, ``\\$32,\\!348 == 32348``, ``5 dollars == 5``.
- Percentages: ``50\\% == 50 == 0.5``; ``7.5\\% == 7.5``.
- Text answers compare as case-insensitive words (``\\text{Evelyn} == evelyn``); choice letters
  ignore their wrapper (``\\text{(C)} == C == (C)``).
- An assignment matches its value: ``x = 3 == 3`` (either side).
- Unordered solution lists match in any order: ``1, 2 == 2, 1``; ``1 \\pm \\sqrt{19}`` needs
  both roots.
- Tuples are ordered; intervals must match endpoints and openness: ``(1,2) != [1,2]``.
- A column (or row) vector matches the tuple of its entries:
  ``\\begin{pmatrix}1\\\\2\\end{pmatrix} == (1,2)``.
- Symbolic expressions compare by simplification: ``\\frac{\\sqrt3}{3} == \\frac{1}{\\sqrt3}``.
- Base subscripts are read as written: ``52_8 == 52`` (the digits the question asked for).

This module imports only the standard library at top level: the worker process loads it by file
path, without importing the ``tir_envs`` package (and its gymnasium registrations).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import NamedTuple

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


class Verdict(NamedTuple):
    """A grading decision and the layer that made it (for logs, debugging and tests)."""

    correct: bool
    method: str
    """One of: empty, too_long, exact, number, text, math_verify, timeout, worker_error."""


class GraderUnavailable(RuntimeError):
    """The grading worker cannot start at all (e.g. math-verify is not installed)."""


# ----------------------------------------------------------------------------------------------
# String layer
# ----------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` (or ``\fbox{}``, ``\boxed x``), else None.

    Braces nest and ``\{``/``\}`` are skipped, so ``\boxed{\{1, \frac{1}{2}\}}`` works; an
    unclosed last box falls back to the complete one before it. The env's turn parser and the
    data loaders use this one reading of a box.
    """
    answer = None
    for match in _BOX.finditer(text):
        content = _box_content(text, match.end())
        if content is not None:
            answer = content
    return answer


def _box_content(text: str, pos: int) -> str | None:
    rest = text[pos:]
    stripped = rest.lstrip()
    if not stripped:
        return None
    if stripped[0] != "{":
        # ``\boxed 5``: one token, up to whitespace or a closing ``$``.
        if rest[:1] not in (" ", "\t"):
            return None
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    start = pos + (len(rest) - len(stripped)) + 1
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped char (``\{``, ``\}``, ``\\``) or a command's first letter
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


_SPACING = re.compile(r"(?<!\\)\\[!,;:> ]|\\q?quad\b|~")  # not the row break ``\\ ``
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])|\\displaystyle")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_TEXT_WRAPPER = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)"
_TRAILING_TEXT_UNIT = re.compile(
    rf"(?<=\S)\s*{_TEXT_WRAPPER}\{{\s*[a-zA-Z][a-zA-Z .]*\}}(\^\{{?\d\}}?)?$"
)
_PLAIN_NUMBER = r"[+-]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)"
_TRAILING_UNIT_WORDS = re.compile(
    rf"^({_PLAIN_NUMBER})\s+([a-zA-Z]{{2,}}(?:\s+[a-zA-Z]+)*)\.?(\^\d)?$"
)
_MATH_WORDS = frozenset(
    ("pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "inf", "infty")
    + ("oo", "nan", "i", "e", "arcsin", "arccos", "arctan")
)
_PERCENT = re.compile(r"(?<!\\)%")
# Symbols models print outside LaTeX; the trailing space keeps ``πr`` from becoming ``\pir``.
_UNICODE_MATH = {
    "\u2212": "-",
    "\u2013": "-",
    "\u221e": "\\infty ",
    "\u03c0": "\\pi ",
    "\u00d7": "\\times ",
}


def normalize_answer(text: str) -> str:
    """Canonical spelling of an answer: no ``\\boxed``, ``$``, ``\\left``, spacing, units, degrees.

    Used for the cheap exact-match layer and as the text sent to math-verify; it never changes
    the value of an answer, only its spelling.
    """
    s = text.replace("\x00", "").strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    for symbol, latex in _UNICODE_MATH.items():
        s = s.replace(symbol, latex)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = _PERCENT.sub(r"\\%", s)
    s = _TRAILING_TEXT_UNIT.sub("", s.strip())
    words = _TRAILING_UNIT_WORDS.match(s)
    if words and words.group(2).split()[0].lower() not in _MATH_WORDS:
        s = words.group(1)
    s = s.strip().rstrip(".").strip()
    # Drop whitespace except where it separates a command from a letter (``\pi r`` != ``\pir``).
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,2})?")
_INT_RATIO = re.compile(r"([+-]?)(\d{1,50})/(\d{1,50})")
_LATEX_FRAC = re.compile(r"([+-]?)\\frac(?:\{(\d{1,50})\}|(\d))(?:\{(\d{1,50})\}|(\d))")
_ASSIGNMENT = re.compile(r"([a-zA-Z])=(.+)")


def _exact_number(s: str) -> tuple[Fraction, bool] | None:
    """``(value, is_decimal)`` for a plain number, ``a/b`` or ``\\frac{a}{b}``; ``None`` otherwise.

    Exponents are capped at two digits so ``1e999999999`` cannot make us build a huge integer.
    """
    if len(s) > 120:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        try:
            return Fraction(Decimal(s)), not s.lstrip("+-").isdigit()
        except (InvalidOperation, ValueError):
            return None
    ratio = _INT_RATIO.fullmatch(s)
    if ratio:
        sign, numerator, denominator = ratio.groups()
    else:
        frac = _LATEX_FRAC.fullmatch(s)
        if not frac:
            return None
        sign, numerator, denominator = frac[1], frac[2] or frac[3], frac[4] or frac[5]
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return (-value if sign == "-" else value), False


def _text_answer(s: str, *, strict: bool) -> str | None:
    """Lower-cased words of a text answer (``\\text{Evelyn}`` -> ``evelyn``; ``(C)`` -> ``c``).

    ``strict`` (used for the gold side) only accepts what is clearly text: a ``\\text``-like
    wrapper, a parenthesized choice letter, or a bare word of 3+ letters that is not a math name.
    The predicted side is read leniently, so ``C`` matches a gold ``\\text{(C)}``.
    """
    inner, wrapped = s, False
    while True:
        match = re.fullmatch(rf"{_TEXT_WRAPPER}\{{(.*)\}}", inner)
        if not match:
            break
        inner, wrapped = match.group(1).strip(), True
    inner = inner.strip().rstrip(".")
    choice = re.fullmatch(r"\(([A-Za-z])\)|([A-Za-z])\)?", inner)
    if choice and (wrapped or inner.startswith("(") or not strict):
        return (choice.group(1) or choice.group(2)).lower()
    if not re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", inner):
        return None
    words = inner.lower()
    if strict and not wrapped and (len(words) < 3 or words in _MATH_WORDS):
        return None
    return re.sub(r"[\s\-]+", " ", words)


def _quick_verdict(pred: str, gold: str) -> Verdict | None:
    """Decide from normalized strings when that is conclusive; ``None`` defers to math-verify."""
    if pred == gold:
        return Verdict(True, "exact")
    gold_text = _text_answer(gold, strict=True)
    if gold_text is not None:
        return Verdict(_text_answer(pred, strict=False) == gold_text, "text")
    pred_assign, gold_assign = _ASSIGNMENT.fullmatch(pred), _ASSIGNMENT.fullmatch(gold)
    if pred_assign and gold_assign and pred_assign[1] != gold_assign[1]:
        return None  # different variable names: let math-verify judge the relation
    pred_value = _exact_number(pred_assign[2] if pred_assign else pred)
    gold_value = _exact_number(gold_assign[2] if gold_assign else gold)
    if pred_value is None or gold_value is None:
        return None
    if pred_value[0] == gold_value[0]:
        return Verdict(True, "number")
    if not pred_value[1] and not gold_value[1]:
        return Verdict(False, "number")  # two exact rationals that differ: conclusive
    return None  # a decimal against another value: math-verify's rounding policy decides


# ----------------------------------------------------------------------------------------------
# math-verify layer (executed inside the worker process)
# ----------------------------------------------------------------------------------------------


def _parse(answer: str) -> list:
    from math_verify import parse

    return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def _as_vector(expr):
    """Entries of a 1-row/1-column matrix, a tuple or an open interval ``(a, b)``; else ``None``."""
    from sympy import Interval, MatrixBase, Tuple

    if isinstance(expr, MatrixBase) and 1 in expr.shape:
        return list(expr)
    if isinstance(expr, Tuple):
        return list(expr)
    if isinstance(expr, Interval) and expr.left_open and expr.right_open:
        return [expr.start, expr.end]
    return None


def _vectors_match(gold: list, pred: list) -> bool:
    """``pmatrix`` column vectors written as tuples (or vice versa) are the same answer."""
    from math_verify import verify
    from sympy import Matrix, MatrixBase

    if not gold or not pred:
        return False
    gold_expr, pred_expr = gold[0], pred[0]
    if not (isinstance(gold_expr, MatrixBase) or isinstance(pred_expr, MatrixBase)):
        return False
    gold_vec, pred_vec = _as_vector(gold_expr), _as_vector(pred_expr)
    if gold_vec is None or pred_vec is None or len(gold_vec) != len(pred_vec):
        return False
    return verify(Matrix(gold_vec), Matrix(pred_vec), timeout_seconds=None)


def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict on two normalized answers, plus our vector and percent rules.

    No timeout of its own: callers run it in the worker process, where the parent enforces one.
    """
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    if verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return True
    if _vectors_match(gold_parsed, pred_parsed):
        return True
    if "\\%" in pred or "\\%" in gold:
        return verify(
            _parse(gold.replace("\\%", "")), _parse(pred.replace("\\%", "")), timeout_seconds=None
        )
    return False


def _worker_main(memory_limit_mb: int) -> None:
    """Serve grading requests (one JSON object per line) until stdin closes or the parent dies."""
    try:
        _serve(memory_limit_mb)
    except BrokenPipeError:
        pass  # the parent went away (e.g. a forked env worker exited while we were starting)
    os._exit(0)  # skip interpreter teardown: flushing a dead pipe would only print noise


def _serve(memory_limit_mb: int) -> None:
    import resource
    import warnings

    parent = os.getppid()
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    out = sys.stdout
    try:
        import math_verify  # noqa: F401  (import cost paid once, before "ready")
        import sympy  # noqa: F401

        math_verify_equal("1", "1")  # warm parser caches
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return
    out.write('{"ready": true}\n')
    out.flush()
    stdin = sys.stdin.buffer
    while True:
        readable, _, _ = select.select([stdin], [], [], 0.25)  # poll for orphaning
        if os.getppid() != parent:
            return  # orphaned: nobody will read our answers
        if not readable:
            continue
        line = stdin.readline()
        if not line:
            return
        request = json.loads(line)
        try:
            reply = {"correct": bool(math_verify_equal(request["pred"], request["gold"]))}
        except RecursionError:
            reply = {"correct": False, "error": "recursion"}
        except MemoryError:
            reply = {"correct": False, "error": "memory"}
        except Exception as exc:  # noqa: BLE001 - a parse failure is a wrong answer, not a crash
            reply = {"correct": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------

# Loads this file by path so the worker does not import the tir_envs package; runs with the
# parent's sys.path so math-verify resolves exactly as it does in the parent.
_BOOT = (
    "import sys, json, importlib.util as u; sys.path[:] = json.loads(sys.argv[1]); "
    "s = u.spec_from_file_location('_tir_grading_worker', sys.argv[3]); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); m._worker_main(int(sys.argv[2]))"
)


class _Worker:
    """One grading subprocess, spoken to in JSON lines over its stdin/stdout pipes."""

    def __init__(self, memory_limit_mb: int):
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, json.dumps(sys.path), str(memory_limit_mb), __file__],
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
        verdict = _quick_verdict(pred_norm, gold_norm) if self.use_string_layer else None
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
