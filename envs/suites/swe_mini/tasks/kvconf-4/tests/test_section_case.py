from kvconf import Config, parse


def test_parsed_section_names_are_lower_case():
    assert parse("[Server]\nport = 1\n") == {"": {}, "server": {"port": "1"}}


def test_get_in_any_case():
    config = Config.load("[Server]\nport = 8080\n")
    assert config.get("server", "port", int) == 8080
    assert config.get("SERVER", "port", int) == 8080
