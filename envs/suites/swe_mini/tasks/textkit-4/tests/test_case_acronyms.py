from textkit import kebab_case, snake_case, words


def test_acronym_followed_by_a_word():
    assert snake_case("HTTPServer") == "http_server"


def test_acronym_in_the_middle():
    assert words("parseXMLDocument") == ["parse", "XML", "Document"]


def test_acronym_at_the_end():
    assert kebab_case("useHTTP") == "use-http"
