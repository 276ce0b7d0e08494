from datetime import date

import pytest

from calendarx import DateRange, merge


def test_length_and_membership():
    june = DateRange(date(2024, 6, 1), date(2024, 6, 30))
    assert len(june) == 30 and date(2024, 6, 15) in june and date(2024, 7, 1) not in june


def test_end_before_start_is_rejected():
    with pytest.raises(ValueError):
        DateRange(date(2024, 6, 2), date(2024, 6, 1))


def test_merge_overlapping():
    a = DateRange(date(2024, 1, 1), date(2024, 1, 10))
    b = DateRange(date(2024, 1, 5), date(2024, 1, 20))
    assert merge([b, a]) == [DateRange(date(2024, 1, 1), date(2024, 1, 20))]


def test_merge_keeps_separate_ranges():
    a = DateRange(date(2024, 1, 1), date(2024, 1, 3))
    b = DateRange(date(2024, 2, 1), date(2024, 2, 3))
    assert merge([a, b]) == [a, b]
