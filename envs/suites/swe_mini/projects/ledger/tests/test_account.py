from decimal import Decimal

import pytest

from ledger import Account, InsufficientFunds, Money, transfer


def test_deposit_and_withdraw():
    account = Account("alice", "USD")
    account.deposit(Money.of("100", "USD"))
    account.withdraw(Money.of("30.50", "USD"))
    assert account.balance() == Money.of("69.50", "USD")


def test_withdraw_beyond_balance_raises():
    account = Account("bob", "EUR")
    account.deposit(Money.of("10", "EUR"))
    with pytest.raises(InsufficientFunds):
        account.withdraw(Money.of("10.01", "EUR"))


def test_overdraft_allows_negative_balance():
    account = Account("carol", "USD", overdraft=Decimal("50"))
    account.withdraw(Money.of("50", "USD"))
    assert account.balance() == Money.of("-50", "USD")


def test_transfer_in_one_currency():
    source, target = Account("a", "USD"), Account("b", "USD")
    source.deposit(Money.of("20", "USD"))
    transfer(source, target, Money.of("5", "USD"))
    assert (source.balance(), target.balance()) == (Money.of("15", "USD"), Money.of("5", "USD"))
