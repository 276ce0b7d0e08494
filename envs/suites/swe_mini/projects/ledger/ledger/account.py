from decimal import Decimal

from ledger.money import CurrencyMismatch, Money


class InsufficientFunds(Exception):
    """A withdrawal would take the balance below the overdraft limit."""


class Account:
    def __init__(self, name: str, currency: str, overdraft: Decimal = Decimal(0)):
        self.name = name
        self.currency = currency
        self.overdraft = Money(Decimal(overdraft), currency)
        self.entries: list[Money] = []

    def balance(self) -> Money:
        total = Money(Decimal(0), self.currency)
        for entry in self.entries:
            total = total + entry
        return total

    def _check(self, money: Money) -> None:
        if money.currency != self.currency:
            raise CurrencyMismatch(f"account {self.name} holds {self.currency}, not {money.currency}")
        if money.amount <= 0:
            raise ValueError("amounts must be positive")

    def deposit(self, money: Money) -> None:
        self._check(money)
        self.entries.append(money)

    def withdraw(self, money: Money) -> None:
        self._check(money)
        if self.balance() - money < -self.overdraft:
            raise InsufficientFunds(f"{self.name}: balance {self.balance()}, asked for {money}")
        self.entries.append(-money)


def transfer(source: Account, target: Account, money: Money) -> None:
    """Move ``money`` from ``source`` to ``target``: both accounts change, or neither does."""
    target._check(money)
    source.withdraw(money)
    target.deposit(money)
