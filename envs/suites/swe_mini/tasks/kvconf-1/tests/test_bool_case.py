from kvconf import Config
from kvconf.types import to_bool


def test_capitalised_booleans():
    assert to_bool("True") is True and to_bool("NO") is False


def test_through_config():
    assert Config.load("[app]\ndebug = True\n").get("app", "debug", bool) is True
