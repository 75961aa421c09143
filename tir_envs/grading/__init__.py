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

The three jobs live in three modules: ``normalize`` (the string layer), ``worker`` (the
math-verify layer, loaded by file path in its own process) and ``pool`` (the ``Grader`` that owns
the worker processes, and the process-wide default behind ``grade``/``judge``).
"""

from __future__ import annotations

from tir_envs.grading.normalize import Verdict, normalize_answer
from tir_envs.grading.pool import (
    DEFAULT_TIMEOUT_S,
    Grader,
    GraderUnavailable,
    default_grader,
    grade,
    judge,
    shutdown,
    warm_up,
)
from tir_envs.grading.worker import math_verify_equal
from tir_envs.protocol import last_boxed

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Grader",
    "GraderUnavailable",
    "Verdict",
    "default_grader",
    "grade",
    "judge",
    "last_boxed",
    "math_verify_equal",
    "normalize_answer",
    "shutdown",
    "warm_up",
]
