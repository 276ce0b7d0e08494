from datetime import date

from calendarx import add_business_days


def test_one_business_day_back():
    assert add_business_days(date(2024, 6, 7), -1) == date(2024, 6, 6)


def test_back_over_a_weekend():
    assert add_business_days(date(2024, 6, 10), -1) == date(2024, 6, 7)


def test_zero_is_the_same_day():
    assert add_business_days(date(2024, 6, 8), 0) == date(2024, 6, 8)
