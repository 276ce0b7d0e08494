"""Exact money arithmetic, accounts and statements."""

from ledger.account import Account, InsufficientFunds, transfer
from ledger.money import CurrencyMismatch, Money

__all__ = ["Account", "CurrencyMismatch", "InsufficientFunds", "Money", "transfer"]
