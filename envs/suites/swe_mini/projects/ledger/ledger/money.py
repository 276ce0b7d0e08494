from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

# Minor-unit digits per ISO 4217 currency.
CURRENCY_DIGITS = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "KWD": 3}


class CurrencyMismatch(ValueError):
    """Two amounts in different currencies were combined."""


@dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str

    def __post_init__(self):
        if self.currency not in CURRENCY_DIGITS:
            raise ValueError(f"unknown currency {self.currency!r}")

    @classmethod
    def of(cls, amount, currency: str) -> "Money":
        """Money from an int, str, float or Decimal; floats are taken at their printed value (0.1 is 0.1)."""
        return cls(Decimal(str(amount)), currency)

    def _same_currency(self, other: "Money") -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(f"{self.currency} and {other.currency}")

    def __add__(self, other: "Money") -> "Money":
        self._same_currency(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: "Money") -> "Money":
        self._same_currency(other)
        return Money(self.amount - other.amount, self.currency)

    def __neg__(self) -> "Money":
        return Money(-self.amount, self.currency)

    def __lt__(self, other: "Money") -> bool:
        self._same_currency(other)
        return self.amount < other.amount

    @property
    def unit(self) -> Decimal:
        """The smallest amount of the currency: 0.01 USD, 1 JPY."""
        return Decimal(1).scaleb(-CURRENCY_DIGITS[self.currency])

    def rounded(self) -> "Money":
        """Rounded to the currency's minor unit with banker's rounding (half to even), as our books require."""
        return Money(self.amount.quantize(self.unit, rounding=ROUND_HALF_EVEN), self.currency)

    def allocate(self, ratios: list[int]) -> list["Money"]:
        """Split into parts proportional to ``ratios`` that add up exactly to the rounded amount; leftover
        minor units go to the first parts."""
        if not ratios or any(ratio < 0 for ratio in ratios) or sum(ratios) == 0:
            raise ValueError("ratios must be non-negative and not all zero")
        units = int(self.rounded().amount / self.unit)
        shares = [units * ratio // sum(ratios) for ratio in ratios]
        for index in range(units - sum(shares)):
            shares[index] += 1
        return [Money(share * self.unit, self.currency) for share in shares]

    def __str__(self) -> str:
        digits = CURRENCY_DIGITS[self.currency]
        return f"{self.rounded().amount:,.{digits}f} {self.currency}"
