"""API-wide conventions named in settings.REST_FRAMEWORK: pagination, and errors as status codes; and the
datetime filter every date-range query parameter uses."""

import re
from datetime import UTC

from django import forms
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django_filters import rest_framework as filters
from django_filters.fields import IsoDateTimeField
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.filters import OrderingFilter
from rest_framework.pagination import PageNumberPagination
from rest_framework.views import exception_handler as drf_exception_handler


class Pagination(PageNumberPagination):
    """``page`` from 1, ``page_size`` 1 to 1000; anything else is a 400 naming the parameter, as the schema says."""

    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not raw.isdigit() or not 1 <= int(raw) <= self.max_page_size:
            raise ValidationError(
                {self.page_size_query_param: [f"must be a whole number from 1 to {self.max_page_size}"]}
            )
        return int(raw)

    def get_page_number(self, request, paginator):
        if request.query_params.get(self.page_query_param) == "":
            raise ValidationError({self.page_query_param: ["must be a whole number from 1"]})
        return super().get_page_number(request, paginator)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"]["minimum"] = 1
            elif parameter["name"] == self.page_size_query_param:
                parameter["schema"].update(minimum=1, maximum=self.max_page_size)
        return parameters


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


def reject_oversize(request, limit: int | None = None) -> None:
    """413 before reading a body whose declared length is over ``limit`` (default ``MEGAFLOW_MAX_UPLOAD_BYTES``)."""
    limit = limit or settings.MEGAFLOW_MAX_UPLOAD_BYTES
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body is over {limit} bytes")


class StrictOrderingFilter(OrderingFilter):
    """``ordering`` is a comma-separated list of the view's ``ordering_fields``, each optionally with ``-``; any
    other value is a 400 naming it (DRF's filter ignores it), and the schema says so with a pattern."""

    def get_ordering(self, request, queryset, view):
        raw = request.query_params.get(self.ordering_param, "")
        allowed = set(getattr(view, "ordering_fields", None) or [])
        if raw and allowed:
            wanted = [term.strip() for term in raw.split(",")]
            unknown = [term for term in wanted if term.removeprefix("-") not in allowed]
            if unknown:
                raise ValidationError(
                    {self.ordering_param: [f"unknown field {unknown[0]!r}; one of: {', '.join(sorted(allowed))}"]}
                )
        return super().get_ordering(request, queryset, view)

    def get_schema_operation_parameters(self, view):
        fields = getattr(view, "ordering_fields", None)
        if not fields:
            return []
        parameters = super().get_schema_operation_parameters(view)
        one = "-?(?:" + "|".join(re.escape(field) for field in fields) + ")"
        for parameter in parameters:
            parameter["schema"]["pattern"] = f"^(?:{one}(?:,{one})*)?$"
            parameter["description"] = f"Sort by these fields, comma-separated, '-' for descending: {', '.join(fields)}"
        return parameters


class StrictFilterSet(filters.FilterSet):
    """A filter given with an empty value is a 400 naming it, unless it filters on text: the schema gives every
    other filter a type (number, date-time, a choice) that an empty value is not. django-filter reads it as no
    filter at all, which hides a client's mistake."""

    def is_valid(self):
        valid = super().is_valid()
        for name, declared in self.filters.items():
            if self.data.get(name) == "" and not isinstance(declared, filters.CharFilter):
                if name in self.form.cleaned_data or not self.form.has_error(name):
                    self.form.add_error(name, "must not be empty")
                valid = False
        return valid


class UtcIsoDateTimeField(IsoDateTimeField):
    """ISO 8601 allows offsets up to ±23:59, PostgreSQL only ±15:59: a value is compared in UTC instead."""

    def to_python(self, value):
        if value == "":
            # Present but empty is not "no filter": the schema says date-time, and a client that sent this meant one.
            raise forms.ValidationError("must be an ISO 8601 date-time", code="invalid")
        value = super().to_python(value)
        if value is None or value.tzinfo is None:
            return value
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("is out of range once converted to UTC", code="invalid") from None


class UtcIsoDateTimeFilter(filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField
