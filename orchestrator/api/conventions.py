"""API-wide conventions named in settings.REST_FRAMEWORK: pagination, and errors as status codes; and the
datetime filter every date-range query parameter uses."""

from datetime import UTC

from django import forms
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django_filters import rest_framework as filters
from django_filters.fields import IsoDateTimeField
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.pagination import PageNumberPagination
from rest_framework.views import exception_handler as drf_exception_handler


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 1000


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "request body too large"
    default_code = "payload_too_large"


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def exception_handler(exc, context):
    """DRF's handler, plus: an oversize body is a 413 (Django calls it a 400)."""
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge(f"request body is over {settings.MEGAFLOW_MAX_UPLOAD_BYTES} bytes")
    return drf_exception_handler(exc, context)


def reject_oversize(request) -> None:
    """413 before reading a body whose declared length is over the limit."""
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > settings.MEGAFLOW_MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(f"request body is over {settings.MEGAFLOW_MAX_UPLOAD_BYTES} bytes")


class UtcIsoDateTimeField(IsoDateTimeField):
    """ISO 8601 allows offsets up to ±23:59, PostgreSQL only ±15:59: a value is compared in UTC instead."""

    def to_python(self, value):
        value = super().to_python(value)
        if value is None or value.tzinfo is None:
            return value
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("is out of range once converted to UTC", code="invalid") from None


class UtcIsoDateTimeFilter(filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField
