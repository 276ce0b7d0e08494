from ledger import Money


def parts(amount, ratios, currency="USD"):
    return [str(part) for part in Money.of(amount, currency).allocate(ratios)]


def test_three_ways():
    assert parts("100", [1, 1, 1]) == ["33.34 USD", "33.33 USD", "33.33 USD"]


def test_parts_add_up():
    shares = Money.of("0.05", "USD").allocate([1, 1])
    assert shares[0] + shares[1] == Money.of("0.05", "USD")


def test_weighted_split_without_remainder():
    assert parts("10", [3, 1]) == ["7.50 USD", "2.50 USD"]
