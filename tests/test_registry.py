"""The one registry helper (``tir_envs.registry``) and the registries built on it."""

from __future__ import annotations

import pytest

import algos
import tir_envs
from algos.advantages import get_advantage
from algos.agent import ALGORITHMS, register_algorithm
from algos.generation import make_generator
from algos.grpo import GRPO
from algos.shaping import get_similarity
from tir_envs.data import BENCHMARKS, benchmark_spec
from tir_envs.procedural import KINDS, generate
from tir_envs.registry import Registry, UnknownName


def first(batch=None):
    return 1


def second(batch=None):
    return 2


def test_register_get_names_in_registration_order():
    reg: Registry = Registry("widget")
    assert reg.register("b", first) is first

    @reg.register("a")
    def decorated():
        return 3

    assert reg["b"] is first and reg.get("a") is decorated
    assert reg.names() == ("b", "a") and list(reg) == ["b", "a"] and len(reg) == 2
    assert "a" in reg and "c" not in reg
    assert dict(reg.items()) == {"b": first, "a": decorated}


def test_same_object_again_is_a_no_op():
    reg: Registry = Registry("widget")
    reg.register("f", first)
    assert reg.register("f", first) is first  # a notebook re-running the registering cell
    assert reg.register("f")(first) is first
    assert reg.names() == ("f",)


def test_an_equal_entry_again_is_a_no_op():
    reg: Registry = Registry("widget")
    reg.register("f", (first, ("gamma",)))
    reg.register("f", (first, ("gamma",)))  # a new but equal record (e.g. fn + metadata)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("f", (first, ("lam",)))


def test_a_different_object_under_a_taken_name_raises_and_keeps_the_first():
    reg: Registry = Registry("widget")
    reg.register("f", first)
    with pytest.raises(ValueError, match="widget 'f' is already registered"):
        reg.register("f", second)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("f")(second)
    assert reg["f"] is first


def test_unknown_name_lists_the_known_names():
    reg: Registry = Registry("widget")
    reg.register("b", first)
    reg.register("a", second)
    with pytest.raises(UnknownName) as info:
        reg.get("c")
    assert str(info.value) == "unknown widget 'c'; known: b, a"  # not quoted, as KeyError would
    # Both a failed lookup and a bad value, so callers catching either keep working.
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownName, match="known: none"):
        Registry("widget")["x"]


def test_unregister():
    reg: Registry = Registry("widget")
    reg.register("f", first)
    assert reg.unregister("f") is first
    assert "f" not in reg
    reg.register("f", second)  # the name is free again
    with pytest.raises(UnknownName):
        reg.unregister("g")


def test_env_ids_are_derived_from_the_benchmark_registry():
    assert list(tir_envs.ENV_IDS.items()) == [
        ("TIR-Math-v0", "procedural"),
        ("TIR-MATH500-v0", "math500"),
        ("TIR-AIME24-v0", "aime24"),
        ("TIR-AMC23-v0", "amc23"),
        ("TIR-GSM8K-v0", "gsm8k"),
        ("TIR-SVAMP-v0", "svamp"),
        ("TIR-AIME25-v0", "aime25"),
        ("TIR-MINERVA-MATH-v0", "minerva_math"),
        ("TIR-OLYMPIADBENCH-v0", "olympiadbench"),
        ("TIR-COLLEGE-MATH-v0", "college_math"),
        ("TIR-ASDIV-v0", "asdiv"),
        ("TIR-GSM-HARD-v0", "gsm_hard"),
        ("TIR-Math-Test-v0", "tir_math_test"),
    ]
    assert [spec.env_id for _, spec in BENCHMARKS.items()] == list(tir_envs.ENV_IDS)[1:]


def test_procedural_kinds_keep_their_order():
    """``ProceduralProblems`` maps index i to ``kinds[i % len(kinds)]``: the order is data."""
    assert KINDS.names() == (
        "big_product", "modpow", "nth_prime", "prime_count", "digit_sum", "gcd_lcm",
        "linear_system", "count_divisible", "binomial", "divisor_count", "totient", "crt",
        "fraction_sum", "base_convert", "derangements", "partitions",
    )


@pytest.mark.parametrize(("kind", "lookup", "known"), [
    ("procedural kind", lambda: generate("nope", 0), "big_product"),
    ("benchmark", lambda: benchmark_spec("nope"), "math500"),
    ("algorithm", lambda: algos.get_algorithm("nope"), "gtpo"),
    ("advantage estimator", lambda: get_advantage("nope"), "gae"),
    ("generation backend", lambda: make_generator("nope"), "openai"),
    ("code similarity", lambda: get_similarity("nope"), "embedding"),
])
def test_every_registry_names_what_it_knows(kind, lookup, known):
    with pytest.raises(UnknownName, match=rf"unknown {kind} 'nope'; known: .*{known}"):
        lookup()


def test_an_algorithm_registers_once_and_again_as_a_no_op():
    assert algos.algorithms() is ALGORITHMS and algos.get_algorithm("grpo") is GRPO
    assert register_algorithm("grpo")(GRPO) is GRPO  # re-running ``@register_algorithm``

    class Other(GRPO):
        pass

    with pytest.raises(ValueError, match="algorithm 'grpo' is already registered"):
        register_algorithm("grpo")(Other)
    assert algos.get_algorithm("grpo") is GRPO
