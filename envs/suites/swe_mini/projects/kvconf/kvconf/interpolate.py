import os
import re

_REFERENCE = re.compile(r"\$\{([^}]+)\}")


class InterpolationError(ValueError):
    pass


def interpolate(sections: dict[str, dict[str, str]], env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Resolve ``${key}`` (same section), ``${section.key}`` and ``${env:NAME}`` in every value.

    A reference to a missing key, or a chain of references that loops back on itself, raises
    ``InterpolationError`` naming the keys involved.
    """
    env = os.environ if env is None else env
    resolved: dict[tuple[str, str], str] = {}

    def lookup(section: str, key: str, chain: tuple[tuple[str, str], ...]) -> str:
        if (section, key) in resolved:
            return resolved[(section, key)]
        if (section, key) in chain:
            loop = " -> ".join(f"{s}.{k}" if s else k for s, k in (*chain, (section, key)))
            raise InterpolationError(f"reference cycle: {loop}")
        try:
            raw = sections[section][key]
        except KeyError:
            raise InterpolationError(f"unknown reference {section + '.' if section else ''}{key}") from None

        def substitute(match: re.Match) -> str:
            name = match.group(1).strip()
            if name.startswith("env:"):
                return env.get(name[4:], "")
            target_section, _, target_key = name.rpartition(".")
            return lookup(target_section if "." in name else section, target_key, (*chain, (section, key)))

        resolved[(section, key)] = value = _REFERENCE.sub(substitute, raw)
        return value

    return {section: {key: lookup(section, key, ()) for key in values} for section, values in sections.items()}
