from ledger import Account, Money
from ledger.report import statement, totals_by_currency


def test_statement_lists_entries_and_balance():
    account = Account("alice", "USD")
    account.deposit(Money.of("1000", "USD"))
    account.withdraw(Money.of("0.5", "USD"))
    text = statement(account)
    assert "1,000.00 USD" in text and "-0.50 USD" in text and text.splitlines()[-1].endswith("999.50 USD")


def test_totals_by_currency():
    usd1, usd2, eur = Account("a", "USD"), Account("b", "USD"), Account("c", "EUR")
    usd1.deposit(Money.of("1", "USD"))
    usd2.deposit(Money.of("2", "USD"))
    eur.deposit(Money.of("3", "EUR"))
    assert totals_by_currency([usd1, usd2, eur]) == {"USD": Money.of("3", "USD"), "EUR": Money.of("3", "EUR")}
