from collections.abc import Collection
from datetime import date, timedelta

WEEKEND = {5, 6}  # Saturday, Sunday


def is_business_day(day: date, holidays: Collection[date] = ()) -> bool:
    return day.weekday() not in WEEKEND and day not in holidays


def add_business_days(start: date, count: int, holidays: Collection[date] = ()) -> date:
    """The date ``count`` business days after ``start`` (before it, for a negative count); ``start`` itself
    is never counted."""
    step = timedelta(days=1 if count >= 0 else -1)
    day = start
    remaining = abs(count)
    while remaining:
        day += step
        if is_business_day(day, holidays):
            remaining -= 1
    return day


def business_days_between(start: date, end: date, holidays: Collection[date] = ()) -> int:
    """Business days in the half-open interval [start, end)."""
    count = 0
    day = start
    while day < end:
        if is_business_day(day, holidays):
            count += 1
        day += timedelta(days=1)
    return count
