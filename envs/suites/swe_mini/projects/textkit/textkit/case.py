import re

# Split points: lower->Upper ("fooBar"), the end of an acronym ("HTTPServer" -> "HTTP" "Server"),
# and runs of underscores, dashes or spaces.
_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|[_\-\s]+")


def words(name: str) -> list[str]:
    """The words of an identifier in any common case style."""
    return [word for word in _BOUNDARY.split(name) if word]


def snake_case(name: str) -> str:
    return "_".join(word.lower() for word in words(name))


def kebab_case(name: str) -> str:
    return "-".join(word.lower() for word in words(name))


def camel_case(name: str) -> str:
    parts = words(name)
    if not parts:
        return ""
    return parts[0].lower() + "".join(word.capitalize() for word in parts[1:])
