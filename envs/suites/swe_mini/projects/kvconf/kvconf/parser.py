class ConfigError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


def strip_inline_comment(value: str) -> str:
    """'8080   # the port' -> '8080'. A comment starts at a '#' or ';' that follows whitespace, so
    'http://host/#top' and 'a;b' keep their characters."""
    for index, char in enumerate(value):
        if char in "#;" and index > 0 and value[index - 1].isspace():
            return value[:index].rstrip()
    return value


def parse(text: str) -> dict[str, dict[str, str]]:
    """Sections of key/value strings. Keys before any ``[section]`` go to section ''. Section names are
    case-insensitive (stored lower-case); keys are kept as written. A value in matching quotes is taken
    verbatim, quotes removed."""
    sections: dict[str, dict[str, str]] = {"": {}}
    current = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(number, "unterminated section header")
            current = line[1:-1].strip().lower()
            sections.setdefault(current, {})
            continue
        key, separator, value = line.partition("=")
        if not separator or not key.strip():
            raise ConfigError(number, f"expected 'key = value', got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        else:
            value = strip_inline_comment(value)
        sections[current][key.strip()] = value
    return sections
