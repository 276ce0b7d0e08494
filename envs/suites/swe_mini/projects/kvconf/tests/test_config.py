import pytest

from kvconf import Config, InterpolationError


def test_typed_get():
    config = Config.load("[server]\nport = 8080\ndebug = on\nhosts = a, b\ntimeout = 30s\n")
    assert config.get("server", "port", int) == 8080
    assert config.get("server", "debug", bool) is True
    assert config.get("server", "hosts", list) == ["a", "b"]
    assert config.get("server", "timeout", "duration") == 30


def test_default_and_missing():
    config = Config.load("[a]\nx = 1\n")
    assert config.get("a", "y", default="fallback") == "fallback"
    with pytest.raises(KeyError):
        config.get("a", "y")


def test_interpolation():
    config = Config.load("[paths]\nroot = /srv\nlogs = ${root}/logs\n[app]\nlog = ${paths.logs}/app.log\nuser = ${env:USER}\n", env={"USER": "ann"})
    assert config.get("app", "log") == "/srv/logs/app.log" and config.get("app", "user") == "ann"


def test_unknown_reference():
    with pytest.raises(InterpolationError, match="unknown reference"):
        Config.load("[a]\nx = ${nope}\n")
