"""The API's request parser, named in settings.REST_FRAMEWORK. It lives apart from orchestrator/api/conventions.py
because DRF resolves ``DEFAULT_PARSER_CLASSES`` while ``rest_framework.views`` loads, and conventions imports
that module: the parser must import nothing that imports the views."""

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class StrictJSONParser(JSONParser):
    """JSON whose strings are text: a lone surrogate (``"\\ud800"``) is valid JSON but not UTF-8, and no database
    stores it; it is a 400 here, not an error deeper in."""

    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        _check_text(data)
        return data


def _check_text(value) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ParseError("JSON parse error - a string holds a lone surrogate, which is not text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)
