"""The OpenAPI schema and its Swagger UI are served to whoever may use the API: anyone on an open site
(DEPTHSITE_PUBLIC_UPLOADS or DEPTHSITE_PUBLIC_STATUS), signed-in users (session or token) on a closed one."""
from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

pytestmark = pytest.mark.django_db

SCHEMA, DOCS = "/api/schema/", "/api/docs/"
OPERATOR_PATH = "/api/models/cache/clear"  # an endpoint only staff may call: not for strangers to list


@pytest.fixture
def closed(settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = False
    settings.DEPTHSITE_PUBLIC_STATUS = False


@pytest.fixture
def member(db):
    return get_user_model().objects.create_user("member", "member@example.com", "pw-member-123")


@pytest.mark.parametrize("accept", ["", "application/json", "application/vnd.oai.openapi+json",
                                    "application/vnd.oai.openapi"])
def test_a_closed_site_refuses_the_schema_to_anonymous_callers_as_json(client, closed, accept):
    response = client.get(SCHEMA, **({"HTTP_ACCEPT": accept} if accept else {}))
    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["extra"]["code"] == "not_authenticated"  # the API's own error shape
    assert response["WWW-Authenticate"] == "Token"
    assert OPERATOR_PATH.encode() not in response.content and b"paths" not in response.content


def test_a_closed_site_refuses_the_schema_whatever_format_is_asked(client, closed):
    for query in ({"format": "json"}, {"format": "yaml"}):
        response = client.get(SCHEMA, query)
        assert response.status_code == 401 and OPERATOR_PATH.encode() not in response.content


def test_a_closed_site_sends_anonymous_visitors_of_the_docs_to_the_login_page(client, closed):
    response = client.get(DOCS)
    assert response.status_code == 302 and response["Location"] == "/accounts/login/?next=/api/docs/"


def test_a_closed_site_serves_both_to_a_signed_in_user(client, closed, member):
    client.force_login(member)
    schema = client.get(SCHEMA, HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200 and OPERATOR_PATH in schema.json()["paths"]
    docs = client.get(DOCS)
    assert docs.status_code == 200 and b"swagger-ui" in docs.content


def test_a_closed_site_serves_the_schema_to_a_token(client, closed, member):
    token = Token.objects.create(user=member).key
    schema = client.get(SCHEMA, HTTP_ACCEPT="application/json", HTTP_AUTHORIZATION=f"Token {token}")
    assert schema.status_code == 200 and OPERATOR_PATH in schema.json()["paths"]
    refused = client.get(SCHEMA, HTTP_ACCEPT="application/json", HTTP_AUTHORIZATION="Token not-a-token")
    assert refused.status_code == 401


@pytest.mark.parametrize("flag", ["DEPTHSITE_PUBLIC_UPLOADS", "DEPTHSITE_PUBLIC_STATUS"])
def test_an_open_site_serves_both_to_anyone(client, settings, flag):
    settings.DEPTHSITE_PUBLIC_UPLOADS = False
    settings.DEPTHSITE_PUBLIC_STATUS = False
    setattr(settings, flag, True)
    schema = client.get(SCHEMA, HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200 and "/api/models/status" in schema.json()["paths"]
    assert client.get(SCHEMA).status_code == 200  # YAML, content negotiation's first choice
    docs = client.get(DOCS)
    assert docs.status_code == 200 and b"swagger-ui" in docs.content
