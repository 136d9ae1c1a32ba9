"""Hostile request bodies to the API: deep nesting, oversized bodies, too many fields (issue 10).

Each must be refused with a 4xx JSON body in the API's shape ({"message", "extra"}), never a 5xx and never
Django's HTML "Bad Request (400)" page.
"""
from __future__ import annotations

import json

import pytest

from depthsite import parsers

OPTIMIZE = "/api/models/cache/optimize"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _error(response) -> dict:
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = json.loads(response.content)
    assert set(body) >= {"message", "extra"}, body
    return body


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [100_000, parsers.MAX_JSON_DEPTH + 1])
def test_deeply_nested_json_is_a_400_naming_the_nesting(staff_client, depth):
    response = staff_client.post(OPTIMIZE, data=_deep(depth), content_type="application/json")
    assert response.status_code == 400
    body = _error(response)
    assert "nest" in body["message"].lower()
    assert body["extra"]["code"] == "parse_error"


@pytest.mark.django_db
def test_deep_objects_are_refused_too(staff_client):
    depth = parsers.MAX_JSON_DEPTH + 1
    text = '{"a":' * depth + "1" + "}" * depth
    response = staff_client.post(OPTIMIZE, data=text, content_type="application/json")
    assert response.status_code == 400
    assert "nest" in _error(response)["message"].lower()


@pytest.mark.django_db
def test_nesting_within_the_bound_still_parses(staff_client):
    # Depth at the bound reaches the view, which then names its own problem (not a parse error).
    response = staff_client.post(OPTIMIZE, data=_deep(parsers.MAX_JSON_DEPTH), content_type="application/json")
    assert response.status_code == 400
    assert _error(response)["extra"].get("code") != "parse_error"


@pytest.mark.django_db
def test_broken_json_is_a_400_naming_json(staff_client):
    response = staff_client.post(OPTIMIZE, data='{"dry_run": ', content_type="application/json")
    assert response.status_code == 400
    assert "json" in _error(response)["message"].lower()


@pytest.mark.django_db
def test_json_body_over_the_upload_limit_is_a_413_json(staff_client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    text = json.dumps({"dry_run": True, "pad": "x" * 20_000})
    response = staff_client.post(OPTIMIZE, data=text, content_type="application/json")
    assert response.status_code == 413
    body = _error(response)
    assert "large" in body["message"].lower()
    assert body["extra"]["limit"] == 10_000


@pytest.mark.django_db
def test_form_body_over_the_upload_limit_is_a_413_json(staff_client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    response = staff_client.post(OPTIMIZE, data="pad=" + "x" * 20_000,
                                 content_type="application/x-www-form-urlencoded")
    assert response.status_code == 413
    assert _error(response)["extra"]["limit"] == 10_000


@pytest.mark.django_db
def test_too_many_form_fields_is_a_400_json(staff_client, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    response = staff_client.post(OPTIMIZE, data="&".join(f"f{i}=1" for i in range(50)),
                                 content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400
    body = _error(response)
    assert "fields" in body["message"].lower()
    assert body["extra"]["limit"] == 10


@pytest.mark.django_db
def test_too_many_multipart_fields_is_a_400_json(staff_client, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    response = staff_client.post("/api/models/import", data={f"f{i}": "1" for i in range(50)})
    assert response.status_code == 400
    assert "fields" in _error(response)["message"].lower()


def test_the_parser_bounds_depth_without_recursion():
    with pytest.raises(parsers.JSONNestingError):
        parsers.check_depth(_deep(10_000_000 // 2), parsers.MAX_JSON_DEPTH)
    # Brackets inside strings are text, not nesting.
    parsers.check_depth(json.dumps(["[" * 10_000, {"k": "{" * 10_000}]), 3)


@pytest.mark.parametrize("tail", ['\\"', "\\", ""])
def test_an_unterminated_string_is_skipped_in_one_pass(tail):
    """The string-skipping pattern takes an unterminated string to the end in one match. Were the closing quote
    required, the search would fail there and start again at every later quote, each time scanning to the end:
    quadratic (16 kB of escaped quotes held a request 0.7 s; the 5 MB an address accepts, hours)."""
    body = "[" * 65 + '"' + '\\"' * 20_000 + tail
    matches = list(parsers._STRING.finditer(body))
    assert [(m.start(), m.end()) for m in matches] == [(65, len(body))]
    # Whole strings still end at their own quote, escaped quotes inside them included.
    text = '["a\\"b", "c\\\\", "d"]'
    assert [m.group() for m in parsers._STRING.finditer(text)] == ['"a\\"b"', '"c\\\\"', '"d"']


@pytest.mark.django_db
def test_an_unterminated_deep_string_is_a_400_json(django_user_model):
    """Signed in with a session, the body is parsed by the CSRF check (DRF's request.POST) before the permission
    and method checks, so this address parses it and then answers 405. What the test holds is that an answer
    comes at all: on the quadratic pattern, 400 kB of escaped quotes would hold the request for hours (the
    structural test above shows why)."""
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.create_user("carol", "c@example.com", "pw-carol-123"))
    client.cookies["csrftoken"] = "a" * 32
    body = "[" * 65 + '"' + '\\"' * 200_000
    response = client.post("/api/predictions/00000000-0000-0000-0000-000000000000/", data=body,
                           content_type="application/json", HTTP_X_CSRFTOKEN="a" * 32)
    assert response.status_code in (400, 405) and _error(response)
