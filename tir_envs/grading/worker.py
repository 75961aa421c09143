"""The math-verify layer of grading, run in a worker process that ``tir_envs.grading.pool`` owns.

The pool starts ``python -c`` and loads this file by path, without importing the ``tir_envs``
package (and its Gymnasium registrations): keep its top-level imports to the standard library.
math-verify and sympy are imported inside the functions, once per worker.

Protocol: one JSON object a line. The worker writes ``{"ready": true}`` (or ``{"error": ...}``)
once sympy is imported, then answers each ``{"pred", "gold"}`` request with ``{"correct": bool}``
(plus ``"error"`` when parsing failed, which counts as a wrong answer). It has no deadline of its
own: the parent enforces one and kills a worker that misses it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys

__all__ = ["main", "math_verify_equal"]


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


def main(memory_limit_mb: int) -> None:
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
