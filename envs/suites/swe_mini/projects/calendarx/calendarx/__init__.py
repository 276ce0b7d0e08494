"""Business days, date ranges and month arithmetic."""

from calendarx.business import add_business_days, business_days_between, is_business_day
from calendarx.months import add_months, month_end
from calendarx.ranges import DateRange, merge

__all__ = [
    "DateRange", "add_business_days", "add_months", "business_days_between", "is_business_day", "merge", "month_end",
]
