from decimal import Decimal

import pytest

from ledger import CurrencyMismatch, Money


def test_addition_in_one_currency():
    assert Money.of("1.10", "USD") + Money.of("2.25", "USD") == Money.of("3.35", "USD")


def test_adding_other_currencies_raises():
    with pytest.raises(CurrencyMismatch):
        Money.of(1, "USD") + Money.of(1, "EUR")


def test_rounding_to_minor_units():
    assert Money.of("2.499", "USD").rounded() == Money.of("2.50", "USD")
    assert Money.of("1234.6", "JPY").rounded().amount == Decimal("1235")


def test_allocate_evenly():
    assert Money.of("10", "USD").allocate([1, 1]) == [Money.of("5.00", "USD"), Money.of("5.00", "USD")]


def test_str_uses_currency_digits():
    assert str(Money.of("1234.5", "USD")) == "1,234.50 USD"
    assert str(Money.of("1234", "JPY")) == "1,234 JPY"


def test_unknown_currency():
    with pytest.raises(ValueError):
        Money.of(1, "XYZ")
