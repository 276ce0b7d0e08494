from textkit import slugify


def test_cut_slug_does_not_end_with_a_separator():
    assert slugify("Hello World", max_length=6) == "hello"


def test_cut_with_a_custom_separator():
    assert slugify("one two three", separator="_", max_length=8) == "one_two"


def test_cut_inside_a_word_keeps_the_prefix():
    assert slugify("Hello World", max_length=8) == "hello-wo"
