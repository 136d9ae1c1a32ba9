"""Long management actions in the background: verify, convert and carrying out optimize answer 202 with a run
to poll (GET /api/models/runs/<id>), a django-q2 task (inline under Q_CLUSTER sync) carries the run out, and
`?wait=1` keeps the synchronous answer."""
from __future__ import annotations

import pytest
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema

from models_registry import cachefs
from depthsite.exceptions import ConflictError
from models_registry.models import ManagementRun, WeightFile
from tests.api.test_models_api import assert_error

pytestmark = pytest.mark.django_db


def queued(response) -> dict:
    assert response.status_code == 202, response.content[:500]
    body = response.json()
    assert response["Location"] == body["url"] and body["url"].endswith(f"/api/models/runs/{body['id']}")
    return body


def test_verify_answers_202_at_once_and_the_run_holds_the_result(staff_client, cached_record, monkeypatch,
                                                                 django_capture_on_commit_callbacks):
    # Queued, not run in the request: the action only runs when the task does.
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        body = queued(staff_client.post("/api/models/MiDaS_small/verify", {"functional": False}, format="json"))
    assert body["status"] == "queued" and body["active"] is True and body["kind"] == "verify"
    assert body["model"] == "MiDaS_small" and body["result"] is None and len(callbacks) == 1

    path = cachefs.absolute(cached_record.path)
    path.write_bytes(path.read_bytes()[: cached_record.size // 2])
    callbacks[0]()  # the commit: async_task runs the task inline (Q_CLUSTER sync)
    run = staff_client.get(body["url"]).json()
    assert run["status"] == "succeeded" and run["active"] is False and run["finished_at"]
    assert run["result"]["ok"] is False and run["result"]["results"][0]["health"] == "corrupt"
    assert "truncated" in run["result"]["message"]
    cached_record.refresh_from_db()
    assert cached_record.health == "corrupt"
    # The synchronous answer is the same body.
    sync = staff_client.post("/api/models/MiDaS_small/verify?wait=1", {"functional": False}, format="json")
    assert sync.status_code == 200 and sync.json()["message"] == run["result"]["message"]


def test_convert_runs_in_the_background(staff_client, cached_small, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        body = queued(staff_client.post("/api/models/MiDaS_small/convert", {"format": "hdf5"}, format="json"))
    run = staff_client.get(body["url"]).json()
    assert run["status"] == "succeeded" and run["params"] == {"format": "h5"}
    assert run["result"]["format"] == "h5" and run["result"]["content_digest"] == cached_small.content_digest
    assert WeightFile.objects.filter(format="h5").exists() and cachefs.absolute(run["result"]["path"]).exists()


def test_what_can_be_told_at_once_is_still_an_error_at_once(staff_client, small_model):
    assert_error(staff_client.post("/api/models/MiDaS_small/convert", {"format": "h5"}, format="json"), 404,
                 "no healthy cached weights of MiDaS_small")
    assert_error(staff_client.post("/api/models/NoSuchNet/verify", {}, format="json"), 404, "unknown model")
    assert_error(staff_client.post("/api/models/MiDaS_small/verify?wait=maybe", {}, format="json"), 400, "wait")
    assert not ManagementRun.objects.exists()


def test_a_failing_run_records_its_error_and_status(staff_client, cached_record, monkeypatch,
                                                    django_capture_on_commit_callbacks):
    def refuse(**kwargs):
        raise ConflictError("MiDaS_small changed while converting; try again")

    monkeypatch.setattr("models_registry.services.export.weight_convert", refuse)
    with django_capture_on_commit_callbacks(execute=True):
        body = queued(staff_client.post("/api/models/MiDaS_small/convert", {"format": "h5"}, format="json"))
    run = staff_client.get(body["url"]).json()
    assert (run["status"], run["error_status"], run["result"]) == ("failed", 409, None)
    assert run["error"] == "MiDaS_small changed while converting; try again"


def test_optimize_plans_at_once_and_carries_out_in_the_background(staff_client, cached_record,
                                                                   django_capture_on_commit_callbacks):
    orphan = cachefs.cache_root() / "MiDaS_small" / "stray.pt"
    orphan.write_bytes(b"x" * 100)
    plan = staff_client.post("/api/models/cache/optimize", {}, format="json")
    assert plan.status_code == 200 and plan.json()["executed"] is False and orphan.exists()
    with django_capture_on_commit_callbacks(execute=True):
        body = queued(staff_client.post("/api/models/cache/optimize", {"dry_run": False}, format="json"))
    run = staff_client.get(body["url"]).json()
    assert body["kind"] == "optimize" and body["model"] is None
    assert run["status"] == "succeeded" and run["result"]["executed"] is True and not orphan.exists()


def test_a_run_whose_worker_stopped_ends_failed_so_pollers_stop(staff_client, small_model, settings):
    from datetime import timedelta

    from django.utils import timezone

    long_ago = timezone.now() - timedelta(seconds=settings.Q_CLUSTER["timeout"] + 120)
    stuck = ManagementRun.objects.create(kind="verify", model=small_model, node="test-node", status="running",
                                         started_at=long_ago)
    fresh = ManagementRun.objects.create(kind="verify", model=small_model, node="test-node", status="running",
                                         started_at=timezone.now())
    body = staff_client.get(f"/api/models/runs/{stuck.pk}").json()
    assert (body["status"], body["active"], body["error_status"]) == ("failed", False, 503)
    assert "interrupted" in body["error"]
    assert staff_client.get(f"/api/models/runs/{fresh.pk}").json()["status"] == "running"


def test_runs_are_for_staff_only(staff_client, user_client, anon_client, small_model):
    run = ManagementRun.objects.create(kind="verify", model=small_model, node="test-node")
    url = f"/api/models/runs/{run.pk}"
    assert staff_client.get(url).status_code == 200
    assert user_client.get(url).status_code == 403
    assert anon_client.get(url).status_code == 401
    assert_error(staff_client.get("/api/models/runs/999999"), 404, "no management run with id 999999")


def test_the_schema_documents_202_and_the_run_endpoint():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    validate_schema(schema)
    paths = schema["paths"]
    for path in ("/api/models/{name}/verify", "/api/models/{name}/convert", "/api/models/cache/optimize"):
        operation = paths[path]["post"]
        assert {"200", "202"} <= set(operation["responses"]), path
        assert "wait" in {p["name"] for p in operation["parameters"]}
    assert "200" in paths["/api/models/runs/{id}"]["get"]["responses"]
