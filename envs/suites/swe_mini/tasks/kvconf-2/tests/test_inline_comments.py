from kvconf import parse


def test_hash_inside_a_value_is_kept():
    assert parse("[docs]\nurl = http://example.com/guide#install\n")["docs"]["url"] == "http://example.com/guide#install"


def test_semicolon_inside_a_value_is_kept():
    assert parse("[a]\npath = a;b\n")["a"]["path"] == "a;b"


def test_comment_after_whitespace_is_removed():
    assert parse("[a]\nport = 80 ; http\n")["a"]["port"] == "80"
