"""The one registry helper (``tir_envs.registry``) and the registries built on it."""

from __future__ import annotations

import pytest

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
