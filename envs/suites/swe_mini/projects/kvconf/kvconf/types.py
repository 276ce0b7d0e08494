import re

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def to_bool(value: str) -> bool:
    """yes/no, true/false, on/off, 1/0, in any letter case."""
    lowered = value.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def to_int(value: str) -> int:
    """Decimal, 0x/0o/0b prefixes, and underscores between digits: '10_000', '0x1F'."""
    return int(value.strip(), 0)


def to_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def to_duration(value: str) -> float:
    """Seconds in '1h30m', '45s', '250ms', '2d'."""
    text = value.strip().replace(" ", "")
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


CONVERTERS = {str: str, bool: to_bool, int: to_int, list: to_list, "duration": to_duration}
