from textkit import slugify


def test_lowercases_and_joins_words():
    assert slugify("Hello World") == "hello-world"


def test_symbols_collapse_to_one_separator():
    assert slugify("a -- b!!c") == "a-b-c"


def test_custom_separator():
    assert slugify("Hello World", separator="_") == "hello_world"


def test_short_slug_is_not_cut():
    assert slugify("abc", max_length=10) == "abc"
