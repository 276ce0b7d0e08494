from textkit import slugify


def test_accents_are_transliterated():
    assert slugify("Crème Brûlée") == "creme-brulee"


def test_city_names():
    assert slugify("São Paulo") == "sao-paulo"


def test_plain_ascii_is_unchanged():
    assert slugify("plain words") == "plain-words"
