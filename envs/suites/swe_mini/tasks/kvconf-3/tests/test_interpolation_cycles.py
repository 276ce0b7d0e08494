import pytest

from kvconf import Config, InterpolationError


def test_two_key_cycle():
    with pytest.raises(InterpolationError, match="reference cycle: a.x -> a.y -> a.x"):
        Config.load("[a]\nx = ${y}\ny = ${x}\n")


def test_self_reference():
    with pytest.raises(InterpolationError, match="reference cycle: a.x -> a.x"):
        Config.load("[a]\nx = ${x}\n")


def test_a_chain_without_a_cycle_resolves():
    assert Config.load("[a]\nx = 1\ny = ${x}\nz = ${y}\n").get("a", "z") == "1"
