r"""Offline, seeded problems where running code genuinely helps: exact big-number arithmetic,
modular exponentiation, primes, counting, linear systems, divisors, digit sums...

Every problem is a pure function of ``(kind, seed)`` and its id ``"proc/<kind>/<seed>"`` regenerates
it anywhere, so a GRPO group, a replay or a bug report names a problem by id alone. Answers are
computed here in plain Python (exact integers and fractions), independently of the
``meta["solver"]`` snippet, a short program that prints the answer and that scripted oracle policies
and tests run in the sandbox.

Seeds below ``HELDOUT_SEEDS`` are held out: no training source draws them (``sample`` starts
there), so evaluation sets built from them, such as ``test_set()`` behind ``TIR-Math-Test-v0``,
are never trained on.

>>> problems = ProceduralProblems()
>>> problems.get("proc/modpow/7").id
'proc/modpow/7'
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache

import numpy as np

from tir_envs.data import BenchmarkSpec, FieldMap, Problem, register_benchmark
from tir_envs.registry import Registry

SOURCE = "procedural"
HELDOUT_SEEDS = 1000
"""Seeds below this are held out for evaluation; ``ProceduralProblems.sample`` never draws them."""
_SIEVE_LIMIT = 1_100_000

Generated = tuple[str, str, str]
"""(question, answer, solver code)."""

KINDS: Registry[Callable[[random.Random], Generated]] = Registry("procedural kind")
"""Kind name -> ``generator(rng) -> (question, answer, solver code)``, in registration order (a
``ProceduralProblems`` index maps to ``kinds[i % len(kinds)]``, so new kinds go at the end)."""


@lru_cache(maxsize=1)
def _sieve() -> bytearray:
    is_prime = bytearray([1]) * (_SIEVE_LIMIT + 1)
    is_prime[0:2] = b"\x00\x00"
    for p in range(2, math.isqrt(_SIEVE_LIMIT) + 1):
        if is_prime[p]:
            is_prime[p * p :: p] = bytes(len(range(p * p, _SIEVE_LIMIT + 1, p)))
    return is_prime


@lru_cache(maxsize=1)
def _primes() -> tuple[int, ...]:
    return tuple(i for i, flag in enumerate(_sieve()) if flag)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@KINDS.register("big_product")
def _big_product(rng: random.Random) -> Generated:
    a, b = rng.randrange(10**14, 10**20), rng.randrange(10**14, 10**20)
    return f"Compute the exact value of ${a} \\times {b}$.", str(a * b), f"print({a} * {b})"


@KINDS.register("modpow")
def _modpow(rng: random.Random) -> Generated:
    base, exp = rng.randrange(2, 1000), rng.randrange(10**5, 10**9)
    mod = rng.choice([10**9 + 7, 998244353, rng.randrange(10**4, 10**7)])
    question = f"What is the remainder when ${base}^{{{exp}}}$ is divided by ${mod}$?"
    return question, str(pow(base, exp, mod)), f"print(pow({base}, {exp}, {mod}))"


@KINDS.register("nth_prime")
def _nth_prime(rng: random.Random) -> Generated:
    n = rng.randrange(500, 20000)
    question = f"What is the {_ordinal(n)} prime number? (The 1st prime is 2.)"
    return question, str(_primes()[n - 1]), f"import sympy\nprint(sympy.prime({n}))"


@KINDS.register("prime_count")
def _prime_count(rng: random.Random) -> Generated:
    low = rng.randrange(10**4, 10**6)
    high = low + rng.randrange(1000, 50000)
    count = sum(_sieve()[low : high + 1])
    question = f"How many prime numbers $p$ satisfy ${low} \\le p \\le {high}$?"
    solver = f"import sympy\nprint(sympy.primepi({high}) - sympy.primepi({low - 1}))"
    return question, str(count), solver


@KINDS.register("digit_sum")
def _digit_sum(rng: random.Random) -> Generated:
    if rng.random() < 0.5:
        base, exp = rng.randrange(2, 100), rng.randrange(100, 1000)
        value, text, expr = base**exp, f"${base}^{{{exp}}}$", f"{base} ** {exp}"
    else:
        n = rng.randrange(50, 500)
        value, text, expr = math.factorial(n), f"${n}!$", f"math.factorial({n})"
    question = f"What is the sum of the decimal digits of {text}?"
    solver = f"import math\nprint(sum(int(d) for d in str({expr})))"
    return question, str(sum(map(int, str(value)))), solver


@KINDS.register("gcd_lcm")
def _gcd_lcm(rng: random.Random) -> Generated:
    if rng.random() < 0.5:
        common = rng.randrange(10**3, 10**6)
        a, b = common * rng.randrange(10**8, 10**10), common * rng.randrange(10**8, 10**10)
        question = f"What is the greatest common divisor of ${a}$ and ${b}$?"
        return question, str(math.gcd(a, b)), f"import math\nprint(math.gcd({a}, {b}))"
    numbers = [rng.randrange(100, 10**4) for _ in range(4)]
    listed = ", ".join(f"${n}$" for n in numbers[:-1]) + f" and ${numbers[-1]}$"
    question = f"What is the least common multiple of {listed}?"
    args = ", ".join(map(str, numbers))
    return question, str(math.lcm(*numbers)), f"import math\nprint(math.lcm({args}))"


def _det(matrix: list[list[int]]) -> Fraction:
    rows = [[Fraction(x) for x in row] for row in matrix]
    det = Fraction(1)
    for col in range(len(rows)):
        pivot = next((r for r in range(col, len(rows)) if rows[r][col] != 0), None)
        if pivot is None:
            return Fraction(0)
        if pivot != col:
            rows[col], rows[pivot] = rows[pivot], rows[col]
            det = -det
        det *= rows[col][col]
        for r in range(col + 1, len(rows)):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col])]
    return det


def _linear_term(coef: int, name: str, first: bool) -> str:
    magnitude = "" if abs(coef) == 1 else str(abs(coef))
    if first:
        return f"{'-' if coef < 0 else ''}{magnitude}{name}"
    return f" {'-' if coef < 0 else '+'} {magnitude}{name}"


@KINDS.register("linear_system")
def _linear_system(rng: random.Random) -> Generated:
    n = rng.choice([3, 4])
    names = ["x", "y", "z", "w"][:n]
    while True:
        matrix = [[rng.randrange(-9, 10) for _ in range(n)] for _ in range(n)]
        if _det(matrix) != 0:
            break
    solution = [rng.randrange(-20, 21) for _ in range(n)]
    rhs = [sum(a * x for a, x in zip(row, solution)) for row in matrix]
    equations = []
    for row, b in zip(matrix, rhs):
        terms = [(a, name) for a, name in zip(row, names) if a != 0]
        lhs = "".join(_linear_term(a, name, i == 0) for i, (a, name) in enumerate(terms))
        equations.append(f"{lhs} = {b}")
    target = " + ".join(f"{i + 1}{name}" if i else name for i, name in enumerate(names))
    answer = sum((i + 1) * x for i, x in enumerate(solution))
    question = (
        "Solve the system of equations\n"
        + "\n".join(f"$${eq}$$" for eq in equations)
        + f"\nWhat is the value of ${target}$?"
    )
    rows = ", ".join(str(row) for row in matrix)
    weights = " + ".join(f"{i + 1} * s[{i}]" for i in range(n))
    solver = (
        f"import sympy\ns = sympy.Matrix([{rows}]).LUsolve(sympy.Matrix({rhs}))\nprint({weights})"
    )
    return question, str(answer), solver


@KINDS.register("count_divisible")
def _count_divisible(rng: random.Random) -> Generated:
    limit = rng.randrange(10**5, 5 * 10**5)
    a, b = rng.sample(range(3, 40), 2)
    c = rng.randrange(2, 12)

    def count(d: int) -> int:
        return limit // d

    either = count(a) + count(b) - count(math.lcm(a, b))
    with_c = count(math.lcm(a, c)) + count(math.lcm(b, c)) - count(math.lcm(a, b, c))
    question = (
        f"How many integers $n$ with $1 \\le n \\le {limit}$ are divisible by ${a}$ or by ${b}$, "
        f"but not by ${c}$?"
    )
    solver = (
        f"print(sum(1 for n in range(1, {limit} + 1) "
        f"if (n % {a} == 0 or n % {b} == 0) and n % {c} != 0))"
    )
    return question, str(either - with_c), solver


@KINDS.register("binomial")
def _binomial(rng: random.Random) -> Generated:
    n = rng.randrange(30, 90)
    k = rng.randrange(5, n // 2)
    question = f"Compute $\\binom{{{n}}}{{{k}}}$."
    return question, str(math.comb(n, k)), f"import math\nprint(math.comb({n}, {k}))"


def _factored_number(rng: random.Random) -> dict[int, int]:
    while True:
        primes = rng.sample(_primes()[:60], rng.randrange(3, 6))
        factors = {p: rng.randrange(1, 5) for p in primes}
        value = math.prod(p**e for p, e in factors.items())
        if 10**7 <= value <= 10**14:
            return factors


@KINDS.register("divisor_count")
def _divisor_count(rng: random.Random) -> Generated:
    factors = _factored_number(rng)
    n = math.prod(p**e for p, e in factors.items())
    answer = math.prod(e + 1 for e in factors.values())
    question = f"How many positive divisors does ${n}$ have?"
    return question, str(answer), f"import sympy\nprint(sympy.divisor_count({n}))"


@KINDS.register("totient")
def _totient(rng: random.Random) -> Generated:
    factors = _factored_number(rng)
    n = math.prod(p**e for p, e in factors.items())
    answer = math.prod((p - 1) * p ** (e - 1) for p, e in factors.items())
    question = (
        f"How many integers $k$ with $1 \\le k \\le {n}$ satisfy $\\gcd(k, {n}) = 1$? "
        "(This is Euler's totient.)"
    )
    return question, str(answer), f"import sympy\nprint(sympy.totient({n}))"


@KINDS.register("crt")
def _crt(rng: random.Random) -> Generated:
    moduli = rng.sample([p for p in range(7, 200) if _sieve()[p]], 3)
    residues = [rng.randrange(1, m) for m in moduli]
    total = math.prod(moduli)
    # Residues are nonzero, so the least non-negative solution is already positive.
    answer = (
        sum(r * (total // m) * pow(total // m, -1, m) for m, r in zip(moduli, residues)) % total
    )
    conditions = ", ".join(f"$x \\equiv {r} \\pmod{{{m}}}$" for m, r in zip(moduli, residues))
    question = f"What is the smallest positive integer $x$ such that {conditions}?"
    solver = f"from sympy.ntheory.modular import crt\nprint(crt({moduli}, {residues})[0])"
    return question, str(answer), solver


@KINDS.register("fraction_sum")
def _fraction_sum(rng: random.Random) -> Generated:
    n, c = rng.randrange(4, 9), rng.randrange(1, 10)
    value = sum(Fraction(k, k * k + c) for k in range(1, n + 1))
    question = (
        f"Compute $\\sum_{{k=1}}^{{{n}}} \\frac{{k}}{{k^2 + {c}}}$ "
        "and give it as a fraction in lowest terms."
    )
    answer = f"\\frac{{{value.numerator}}}{{{value.denominator}}}"
    solver = (
        "from fractions import Fraction\n"
        f"print(sum(Fraction(k, k * k + {c}) for k in range(1, {n} + 1)))"
    )
    return question, answer, solver


@KINDS.register("base_convert")
def _base_convert(rng: random.Random) -> Generated:
    n, base = rng.randrange(10**6, 10**10), rng.randrange(3, 10)
    digits, rest = [], n
    while rest:
        rest, digit = divmod(rest, base)
        digits.append(str(digit))
    question = f"Write the decimal number ${n}$ in base ${base}$. Give only the digits."
    solver = (
        f"n, digits = {n}, ''\n"
        f"while n:\n    n, d = divmod(n, {base})\n    digits = str(d) + digits\n"
        "print(digits)"
    )
    return question, "".join(reversed(digits)), solver


@KINDS.register("derangements")
def _derangements(rng: random.Random) -> Generated:
    n = rng.randrange(7, 25)
    counts = [1, 0]
    for i in range(2, n + 1):
        counts.append((i - 1) * (counts[-1] + counts[-2]))
    question = (
        f"How many permutations of $1, 2, \\ldots, {n}$ leave no number in its original position?"
    )
    solver = (
        "d = [1, 0]\n"
        f"for i in range(2, {n} + 1):\n    d.append((i - 1) * (d[-1] + d[-2]))\n"
        "print(d[-1])"
    )
    return question, str(counts[n]), solver


@KINDS.register("partitions")
def _partitions(rng: random.Random) -> Generated:
    n = rng.randrange(30, 200)
    ways = [1] + [0] * n
    for part in range(1, n + 1):
        for total in range(part, n + 1):
            ways[total] += ways[total - part]
    question = (
        f"In how many ways can ${n}$ be written as a sum of positive integers, "
        "where the order of the terms does not matter?"
    )
    return question, str(ways[n]), f"import sympy\nprint(sympy.partition({n}))"


def generate(kind: str, seed: int) -> Problem:
    """The problem ``proc/<kind>/<seed>``; the same on every machine and Python version."""
    generator = KINDS.get(kind)
    # A str seed hashes with SHA-512 inside ``random``: stable across processes and platforms.
    rng = random.Random(f"{kind}/{seed}")
    question, answer, solver = generator(rng)
    return Problem(
        id=f"proc/{kind}/{seed}",
        question=question,
        answer=answer,
        source=SOURCE,
        meta={"kind": kind, "seed": seed, "solver": solver},
    )


def from_id(problem_id: str) -> Problem:
    """Regenerate a problem from its id ``proc/<kind>/<seed>``."""
    prefix, _, rest = problem_id.partition("/")
    kind, _, seed = rest.partition("/")
    if prefix != "proc" or not kind or not seed.isdigit():
        raise KeyError(f"not a procedural problem id: {problem_id!r} (expected proc/<kind>/<seed>)")
    return generate(kind, int(seed))


class ProceduralProblems:
    """An endless problem source over some kinds (all by default).

    ``get`` takes an id (``"proc/<kind>/<seed>"``) or an index ``i``, which means kind
    ``kinds[i % len(kinds)]`` with seed ``i // len(kinds)``; ``sample`` draws a kind and a seed
    ``>= min_seed`` from the env's generator, so a seeded ``reset`` is reproducible and training
    never meets a held-out problem.
    """

    def __init__(self, kinds: Sequence[str] | None = None, min_seed: int = HELDOUT_SEEDS):
        self.kinds = tuple(kinds) if kinds else tuple(KINDS)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise KeyError(f"unknown procedural kinds {unknown}; known: {sorted(KINDS)}")
        if not 0 <= min_seed < 2**31:
            raise ValueError(f"min_seed must be in [0, 2**31), got {min_seed}")
        self.min_seed = min_seed

    def get(self, key: str | int) -> Problem:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if key < 0:
                raise IndexError(f"problem index must be >= 0, got {key}")
            return generate(self.kinds[key % len(self.kinds)], int(key) // len(self.kinds))
        if isinstance(key, str):
            return from_id(key)
        raise TypeError(
            f"problem key must be an id string or an int index, got {type(key).__name__}"
        )

    def sample(self, np_random: np.random.Generator) -> Problem:
        kind = self.kinds[int(np_random.integers(len(self.kinds)))]
        return generate(kind, int(np_random.integers(self.min_seed, 2**31)))

    def __repr__(self) -> str:
        return f"ProceduralProblems(kinds={list(self.kinds)}, min_seed={self.min_seed})"


TEST_KINDS = (
    "big_product", "modpow", "nth_prime", "prime_count", "digit_sum", "gcd_lcm", "linear_system",
    "count_divisible", "binomial", "divisor_count", "totient", "crt", "fraction_sum",
    "base_convert", "derangements", "partitions",
)
"""The kinds of the pinned test set: written out, so a kind added later does not change it."""
TEST_SEEDS_PER_KIND = 8


def test_set() -> list[Problem]:
    """The pinned procedural test set (``TIR-Math-Test-v0``): seeds ``0..7`` of every kind in
    ``TEST_KINDS``, seed-major, so its first ``16 k`` problems cover every kind ``k`` times.
    All seeds are held out (below ``HELDOUT_SEEDS``): no training source ever draws them."""
    return [generate(kind, seed) for seed in range(TEST_SEEDS_PER_KIND) for kind in TEST_KINDS]


register_benchmark(BenchmarkSpec(
    name="tir_math_test", file_stem="", hub_id="", hub_split="",
    fields=FieldMap(("question",), "answer", "id"), build=test_set, env_name="Math-Test",
))


def oracle_turn(problem_id: str, observation: str) -> str:
    """A scripted policy that always solves procedural problems: for tests and benchmarks.

    Stateless, so it works per env inside vector envs: on the prompt it runs the problem's solver;
    on a tool output it boxes the last printed line.
    """
    if observation.startswith("```output"):
        body = observation.removeprefix("```output\n").rsplit("\n```", 1)[0]
        lines = body.strip().splitlines()
        return f"The code printed the result.\n\n\\boxed{{{lines[-1] if lines else ''}}}"
    return f"Let me compute it.\n```python\n{from_id(problem_id).meta['solver']}\n```"
