import pytest

from textkit import wrap


def test_wraps_at_word_boundaries():
    assert wrap("the quick brown fox", 10) == ["the quick", "brown fox"]


def test_long_words_are_split():
    assert wrap("abcdefghij", 4) == ["abcd", "efgh", "ij"]


def test_whitespace_collapses():
    assert wrap("  a   b  ", 10) == ["a b"]


def test_width_must_be_positive():
    with pytest.raises(ValueError):
        wrap("a", 0)
