from kvconf.interpolate import interpolate
from kvconf.parser import parse
from kvconf.types import CONVERTERS

_MISSING = object()


class Config:
    """Parsed, interpolated configuration with typed getters."""

    def __init__(self, sections: dict[str, dict[str, str]]):
        self.sections = sections

    @classmethod
    def load(cls, text: str, env: dict[str, str] | None = None) -> "Config":
        return cls(interpolate(parse(text), env))

    def get(self, section: str, key: str, type=str, default=_MISSING):
        """The value of ``key`` in ``section`` (case-insensitive) converted by ``type`` (str, bool, int, list
        or "duration"); ``default`` when the key is absent, KeyError when there is no default."""
        values = self.sections.get(section.lower(), {})
        if key not in values:
            if default is _MISSING:
                raise KeyError(f"{section}.{key}")
            return default
        return CONVERTERS[type](values[key])
