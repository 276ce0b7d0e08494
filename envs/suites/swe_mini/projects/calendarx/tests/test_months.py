from datetime import date

from calendarx import add_months, month_end


def test_add_months_keeps_the_day():
    assert add_months(date(2024, 1, 15), 1) == date(2024, 2, 15)


def test_add_months_across_the_year_end():
    assert add_months(date(2024, 11, 15), 3) == date(2025, 2, 15)


def test_month_end():
    assert month_end(date(2024, 2, 10)) == date(2024, 2, 29)
