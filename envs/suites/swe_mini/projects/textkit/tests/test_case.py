from textkit import camel_case, kebab_case, snake_case, words


def test_words_from_camel_case():
    assert words("parseJsonValue") == ["parse", "Json", "Value"]


def test_snake_case_from_kebab():
    assert snake_case("max-retry-count") == "max_retry_count"


def test_camel_case_from_snake():
    assert camel_case("user_id_list") == "userIdList"


def test_kebab_case_from_spaces():
    assert kebab_case("Hello big World") == "hello-big-world"
