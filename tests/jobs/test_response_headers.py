"""What every answer says beyond its body: private by default (Cache-Control), and under /api/ Django's own
errors in the API's JSON shape."""
from __future__ import annotations

import uuid

import pytest
from django.test import Client

from depthsite.cache_headers import DEFAULT
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db


def test_one_clients_answers_are_never_stored_by_a_shared_cache_or_kept_after_sign_out(api, user, cached_small,
                                                                                    run_jobs):
    with run_jobs():
        created = api.post("/api/predictions/", {"image": upload(), "outputs": ["png"]}, format="multipart")
    body = api.get(created.json()["url"]).json()
    assert body["status"] == "succeeded", body
    web = Client()
    web.force_login(user)
    answers = {"api file": api.get(body["files"]["png"]), "api job": api.get(body["url"]),
               "web page": web.get(body["page_url"]), "web file": web.get(f"/jobs/{body['id']}/files/png"),
               "web input": web.get(f"/jobs/{body['id']}/input"), "history": web.get("/jobs/"),
               "models": api.get("/api/models/")}
    for label, response in answers.items():
        assert response.status_code == 200, label
        cache_control = response["Cache-Control"]
        assert "no-store" in cache_control and "private" in cache_control, (label, cache_control)
        assert "public" not in cache_control and "max-age=3" not in cache_control, label
    assert answers["web file"]["Cache-Control"] == DEFAULT


def test_a_view_that_names_its_own_caching_keeps_it(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Cache-Control"] == DEFAULT  # names none: private
    from django.http import HttpResponse
    from depthsite.cache_headers import PrivateByDefaultMiddleware

    def cached(request):
        answer = HttpResponse("x")
        answer["Cache-Control"] = "public, max-age=60"
        return answer

    assert PrivateByDefaultMiddleware(cached)(None)["Cache-Control"] == "public, max-age=60"


@pytest.mark.parametrize("path", ["/api/predictions/{id}/files/png/x", "/api/predictions/{id}/files/",
                                  "/api/nothing-here/", "/api/models/MiDaS_small/verify/extra"])
def test_an_address_no_api_view_serves_is_a_json_404(api, path):
    response = api.get(path.format(id=uuid.uuid4()))
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"message", "extra"} and body["extra"]["code"] == "not_found"


def test_outside_the_api_a_404_is_still_a_page(client):
    response = client.get("/no-such-page/")
    assert response.status_code == 404 and response["Content-Type"].startswith("text/html")


def test_a_server_error_under_the_api_is_json_and_says_nothing_of_the_failure(user, monkeypatch):
    from inference.api import views

    def fail(*args, **kwargs):
        raise RuntimeError("/srv/secret/path went wrong")

    monkeypatch.setattr(views.PredictionListView, "get", fail)
    client = Client(raise_request_exception=False)
    client.force_login(user)
    response = client.get("/api/predictions/")
    assert response.status_code == 500 and response["Content-Type"] == "application/json"
    assert response.json()["extra"] == {"code": "server_error"} and "secret" not in response.content.decode()


def test_under_a_prefix_the_api_is_told_by_its_address_within_the_site(api):
    response = api.get("/api/nothing-here/", SCRIPT_NAME="/depth")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
