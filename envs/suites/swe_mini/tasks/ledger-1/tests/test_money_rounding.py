from decimal import Decimal

from ledger import Money


def test_half_cents_round_to_even():
    assert Money.of("0.125", "USD").rounded() == Money.of("0.12", "USD")
    assert Money.of("0.135", "USD").rounded() == Money.of("0.14", "USD")


def test_half_yen_rounds_to_even():
    assert Money.of("2.5", "JPY").rounded().amount == Decimal("2")


def test_not_a_tie_rounds_normally():
    assert Money.of("0.126", "USD").rounded() == Money.of("0.13", "USD")
