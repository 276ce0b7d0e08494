import pytest

from kvconf.types import to_bool, to_duration, to_int, to_list


def test_booleans():
    assert to_bool("yes") is True and to_bool("off") is False
    with pytest.raises(ValueError):
        to_bool("maybe")


def test_integers_with_prefixes():
    assert to_int("0x1F") == 31 and to_int("42") == 42


def test_lists():
    assert to_list("a, b,,c ") == ["a", "b", "c"]


def test_durations():
    assert to_duration("1h30m") == 5400 and to_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        to_duration("5 parsecs")
