import pytest

from kvconf import ConfigError, parse


def test_sections_and_keys():
    assert parse("top = 1\n[server]\nport = 8080\n") == {"": {"top": "1"}, "server": {"port": "8080"}}


def test_comments_and_blank_lines_are_ignored():
    assert parse("# comment\n; another\n\n[a]\nx = 1  # trailing\n") == {"": {}, "a": {"x": "1"}}


def test_quoted_values_are_verbatim():
    assert parse('[a]\nmotto = "  spaced # not a comment  "\n')["a"]["motto"] == "  spaced # not a comment  "


def test_missing_equals_is_an_error_with_its_line():
    with pytest.raises(ConfigError, match="line 2"):
        parse("[a]\njust words\n")
