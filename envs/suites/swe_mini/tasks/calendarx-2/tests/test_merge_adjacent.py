from datetime import date

from calendarx import DateRange, merge


def test_adjacent_ranges_merge():
    first = DateRange(date(2024, 1, 1), date(2024, 1, 5))
    second = DateRange(date(2024, 1, 6), date(2024, 1, 10))
    assert merge([second, first]) == [DateRange(date(2024, 1, 1), date(2024, 1, 10))]


def test_a_one_day_gap_keeps_ranges_apart():
    first = DateRange(date(2024, 1, 1), date(2024, 1, 5))
    second = DateRange(date(2024, 1, 7), date(2024, 1, 10))
    assert merge([first, second]) == [first, second]
