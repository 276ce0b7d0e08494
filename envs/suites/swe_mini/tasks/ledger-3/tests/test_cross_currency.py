import pytest

from ledger import Account, CurrencyMismatch, Money, transfer


def test_subtracting_another_currency_raises():
    with pytest.raises(CurrencyMismatch):
        Money.of(1, "USD") - Money.of(1, "EUR")


def test_transfer_into_another_currency_changes_nothing():
    usd, eur = Account("ops", "USD"), Account("eu", "EUR")
    usd.deposit(Money.of(20, "USD"))
    with pytest.raises(CurrencyMismatch):
        transfer(usd, eur, Money.of(5, "USD"))
    assert usd.balance() == Money.of(20, "USD")
    assert eur.entries == []
