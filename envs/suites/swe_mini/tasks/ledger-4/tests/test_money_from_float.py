from decimal import Decimal

from ledger import Money


def test_float_amounts_are_taken_as_printed():
    assert Money.of(19.99, "USD").amount == Decimal("19.99")


def test_float_sums_are_exact():
    assert Money.of(0.1, "USD") + Money.of(0.2, "USD") == Money.of(0.3, "USD")


def test_integers_still_work():
    assert Money.of(5, "JPY").amount == Decimal(5)
