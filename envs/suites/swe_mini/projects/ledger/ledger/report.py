from ledger.account import Account
from ledger.money import Money


def statement(account: Account) -> str:
    """One line per entry and a closing balance, amounts right-aligned."""
    lines = [f"Statement for {account.name} ({account.currency})"]
    for number, entry in enumerate(account.entries, start=1):
        lines.append(f"{number:>4}  {str(entry):>20}")
    lines.append(f"{'balance':>4}  {str(account.balance()):>20}")
    return "\n".join(lines)


def totals_by_currency(accounts: list[Account]) -> dict[str, Money]:
    totals: dict[str, Money] = {}
    for account in accounts:
        balance = account.balance()
        totals[account.currency] = totals[account.currency] + balance if account.currency in totals else balance
    return totals
