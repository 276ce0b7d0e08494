from datetime import date

from calendarx import add_months


def test_end_of_january_plus_one_month_in_a_leap_year():
    assert add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)


def test_end_of_january_plus_one_month():
    assert add_months(date(2023, 1, 31), 1) == date(2023, 2, 28)


def test_clamping_going_back():
    assert add_months(date(2024, 5, 31), -1) == date(2024, 4, 30)
