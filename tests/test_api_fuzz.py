"""No input makes the API answer 500: schemathesis generates requests from our own OpenAPI schema and sends them
to the real Django app (WSGI, in process, against the test database), a bounded number per operation."""

import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core import signals
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error

from megaflow_site.wsgi import application

schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))


@pytest.fixture
def token(db, swe_mini) -> str:
    user = User.objects.create_user("fuzzer", password="x" * 12)
    # As Django's test client does: the test's transaction holds the connection, so a request must not close it.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield Token.objects.create(user=user).key
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_input_is_a_server_error(case, token):
    case.call_and_validate(app=application, headers={"Authorization": f"Token {token}"}, checks=[not_a_server_error])
