import calendar
from datetime import date


def add_months(day: date, months: int) -> date:
    """The same day of the month ``months`` later (earlier if negative), clamped to the last day of a
    shorter month: Jan 31 + 1 month is Feb 29 in a leap year."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    last = calendar.monthrange(year, month)[1]
    return day.replace(year=year, month=month, day=min(day.day, last))


def month_end(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])
