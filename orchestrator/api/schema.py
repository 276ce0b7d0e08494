"""What the OpenAPI schema says beyond what drf-spectacular infers: every error status an operation can answer,
and string inputs that cannot carry a NUL character (neither Django's forms nor PostgreSQL take one).

Named in settings.SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]; schemathesis (tests/test_api_schema.py) holds
the live API to it.
"""

from __future__ import annotations

ERROR = {
    "type": "object",
    "additionalProperties": True,
    "description": 'Why the request was refused: {"detail": reason}, or {field: [reasons]} for a bad field.',
}
NO_NUL = "^[^\\u0000]*$"
NUMBER_FILTER_LIMIT = 1e50
IDEMPOTENCY_KEY = "Idempotency-Key"
IDEMPOTENCY_KEY_MAX = 200
IDEMPOTENCY_KEY_PATTERN = "^[!-~]*$"  # visible ASCII: a header value every client and proxy passes unchanged


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _needs(path: str, method: str, operation: dict) -> dict[str, str]:
    """The error statuses an operation can answer, each with when."""
    statuses = {
        "401": "no token, or an unknown one",
        "403": "not allowed",
        "429": "too many requests (MEGAFLOW_API_RATE)",
    }
    parameters = {parameter["name"] for parameter in operation.get("parameters", [])}
    if "{" in path:
        statuses["404"] = "no such object, or not yours"
    if "page" in parameters:
        statuses["400"] = "a bad query parameter: the body names it and the reason"
        statuses["404"] = "no such page"
    if "requestBody" in operation:
        statuses["400"] = "a bad field: the body names it and the reason"
        statuses["413"] = "request body over MEGAFLOW_MAX_UPLOAD_BYTES"
        statuses["415"] = "a content type the operation does not take"
    return statuses


def _forbid_nul(schema: dict) -> None:
    if schema.get("type") == "string" and not ({"enum", "format", "pattern"} & schema.keys()):
        schema["pattern"] = NO_NUL
    for value in schema.get("properties", {}).values():
        _forbid_nul(value)
    if isinstance(schema.get("items"), dict):
        _forbid_nul(schema["items"])


def document_errors(result: dict, generator, request, public) -> dict:
    """Postprocessing hook: add the error responses and NUL-free string patterns to every operation."""
    components = result.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status, description in _needs(path, method, operation).items():
                responses.setdefault(status, _error(description))
            parameters = operation.get("parameters", [])
            by_name = {parameter["name"]: parameter for parameter in parameters}
            for parameter in parameters:
                schema = parameter.get("schema", {})
                if parameter.get("in") == "query":
                    _forbid_nul(schema)
                    if schema.get("type") == "number":
                        # django-filter's NumberFilter is a DecimalField of at most 1e50.
                        schema.setdefault("maximum", NUMBER_FILTER_LIMIT)
                    # ``status__in`` takes the values ``status`` takes, comma-separated.
                    single = by_name.get(parameter["name"].removesuffix("__in"), {}).get("schema", {})
                    if parameter["name"].endswith("__in") and "enum" in single and schema.get("type") == "array":
                        schema["items"] = {"type": "string", "enum": single["enum"]}
                        schema["minItems"] = 1
                elif parameter.get("in") == "header" and parameter["name"] == IDEMPOTENCY_KEY:
                    schema.update(pattern=IDEMPOTENCY_KEY_PATTERN, maxLength=IDEMPOTENCY_KEY_MAX)
    for name, schema in components.items():
        if name.endswith("Request"):
            _forbid_nul(schema)
    return result
