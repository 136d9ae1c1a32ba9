"""The OpenAPI document and its Swagger UI, and a bounded, deterministic schemathesis run over the whole API."""
from __future__ import annotations

import re

import pytest
import schemathesis
from django.contrib.staticfiles import finders
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, Phase, given, settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = 12  # per operation: about a minute for the whole API on two cores

# operationId -> (method, path, the statuses it documents at least)
OPERATIONS = {
    "models_list": ("get", "/api/models/", {"200", "401", "403"}),
    "models_retrieve": ("get", "/api/models/{name}/", {"200", "404"}),
    "models_status": ("get", "/api/models/status", {"200", "401"}),
    "models_cache_info": ("get", "/api/models/cache/info", {"200", "401"}),
    "models_cache_clear": ("post", "/api/models/cache/clear", {"200", "400", "401", "403", "429"}),
    "models_cache_optimize": ("post", "/api/models/cache/optimize", {"200", "400", "403"}),
    "models_download": ("post", "/api/models/{name}/download", {"202", "404", "409", "503"}),
    "models_downloads_retrieve": ("get", "/api/models/downloads/{id}", {"200", "404"}),
    "models_verify": ("post", "/api/models/{name}/verify", {"200", "404"}),
    "models_convert": ("post", "/api/models/{name}/convert", {"200", "400", "404", "409"}),
    "models_export": ("get", "/api/models/{name}/export", {"200", "400", "403", "404"}),
    "models_import": ("post", "/api/models/import", {"201", "400", "413", "422"}),
    "predictions_batch_create": ("post", "/api/predictions/batch", {"202", "400", "413", "429"}),
    "predictions_batch_retrieve": ("get", "/api/predictions/batch/{id}", {"200", "404"}),
    "predictions_batch_archive_retrieve": ("get", "/api/predictions/batch/{id}/archive", {"200", "404", "409"}),
}


def test_the_schema_is_valid_openapi_and_documents_every_endpoint():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    validate_schema(schema)
    found = {op["operationId"]: (method, path, set(op["responses"]))
             for path, item in schema["paths"].items() for method, op in item.items()}
    for operation_id, (method, path, statuses) in OPERATIONS.items():
        assert found[operation_id][:2] == (method, path)
        assert statuses <= found[operation_id][2], (operation_id, found[operation_id][2])
    # The other trailing-slash spelling of each path is routed but not documented twice.
    assert "/api/models/status/" not in schema["paths"] and "/api/models/{name}" not in schema["paths"]
    export = schema["paths"]["/api/models/{name}/export"]["get"]
    assert export["responses"]["200"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert {p["name"] for p in export["parameters"]} == {"name", "format", "bundle"}
    imported = schema["paths"]["/api/models/import"]["post"]["requestBody"]["content"]
    assert list(imported) == ["multipart/form-data"]


@pytest.mark.django_db
def test_schema_and_swagger_ui_are_served_without_a_cdn(client, django_user_model):
    # A closed site (the default) serves them to signed-in users (tests/test_schema_access.py).
    client.force_login(django_user_model.objects.create_user("reader"))
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200 and "/api/models/status" in response.json()["paths"]
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any("drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in url for url in assets)
    assert not [url for url in assets if url.startswith(("http:", "https:", "//"))]
    assert finders.find("drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")


# --- schemathesis --------------------------------------------------------------------------------


@pytest.fixture
def api_schema(db, settings, operator, cached_record, staff_token):
    """The live schema of the whole site, from the WSGI app in this process (same test database), with
    MiDaS_small cached so that verify, convert and export reach real files."""
    from depthsite.wsgi import application

    # A fuzzer is a burst of writes: lift the limits, or most of the run would test the 429 path.
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"writes": "100000/minute", "uploads": "100000/minute"}}
    settings.DEPTHSITE_MODEL_MIRROR = ""
    # Django's test client keeps the test's connection open across requests; a bare WSGI call would close it
    # at request_finished, inside the test's transaction.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        # A closed site serves its schema to signed-in callers only.
        yield schemathesis.openapi.from_wsgi("/api/schema/", application,
                                             headers={"Authorization": f"Token {staff_token}"})
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def staff_token(operator) -> str:
    return Token.objects.get_or_create(user=operator)[0].key


def _fuzz(operation, token: str) -> None:
    """Up to MAX_EXAMPLES generated requests to one operation, as staff; raises on the first 5xx (shrunk)."""

    strategy = operation.as_strategy()
    if any(parameter.name == "name" for parameter in operation.path_parameters):
        # Random names only ever meet 404; half the cases name a real model, so the services run too.
        strategy = st.one_of(strategy, operation.as_strategy(path_parameters={"name": "MiDaS_small"}))

    @given(case=strategy)
    @hypothesis_settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate,
                                                                          Phase.shrink])
    def run(case):
        response = case.call(headers={"Authorization": f"Token {token}"})
        case.validate_response(response, checks=[not_a_server_error])

    run()


@pytest.mark.slow
def test_no_operation_answers_with_a_server_error(api_schema, staff_token):
    """Every operation of /api/schema/ (the registry's and the predictions'), fuzzed as staff, so each request
    gets past its permission check into the services; the isolated test cache may be cleared or optimized."""
    failures, operations = [], 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        try:
            _fuzz(operation, staff_token)
        except Exception as exc:  # collect every operation's failure, not only the first
            failures.append(f"{operation.label}: {exc}")
    assert operations >= len(OPERATIONS)
    assert not failures, "\n\n".join(failures)
