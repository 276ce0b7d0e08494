from datetime import date

from calendarx import add_months


def test_back_across_the_year_start():
    assert add_months(date(2024, 3, 15), -3) == date(2023, 12, 15)


def test_back_more_than_a_year():
    assert add_months(date(2024, 1, 10), -13) == date(2022, 12, 10)


def test_back_within_the_year():
    assert add_months(date(2024, 5, 1), -2) == date(2024, 3, 1)
