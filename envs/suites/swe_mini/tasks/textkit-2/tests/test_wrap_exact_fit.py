from textkit import wrap


def test_a_line_that_fits_exactly_is_kept():
    assert wrap("aaa bbb", 7) == ["aaa bbb"]


def test_exact_fit_then_wrap():
    assert wrap("ab cd ef", 5) == ["ab cd", "ef"]


def test_one_short_of_fitting_wraps():
    assert wrap("aaa bbbb", 7) == ["aaa", "bbbb"]
