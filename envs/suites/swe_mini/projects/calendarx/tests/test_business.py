from datetime import date

from calendarx import add_business_days, business_days_between, is_business_day

MONDAY = date(2024, 6, 3)


def test_weekends_are_not_business_days():
    assert is_business_day(MONDAY)
    assert not is_business_day(date(2024, 6, 8))


def test_add_business_days_skips_the_weekend():
    assert add_business_days(date(2024, 6, 7), 1) == date(2024, 6, 10)


def test_holidays_are_skipped():
    assert add_business_days(MONDAY, 1, holidays={date(2024, 6, 4)}) == date(2024, 6, 5)


def test_business_days_between_a_week():
    assert business_days_between(MONDAY, date(2024, 6, 10)) == 5
