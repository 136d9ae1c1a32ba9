"""The registry's REST endpoints as a staff script or a signed-in user sees them: reads, cache actions, downloads."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from models_registry import cachefs
from depthsite.choices import RunStatus
from models_registry.choices import Health
from models_registry.models import WarmModel, WeightDownload, WeightFile

pytestmark = pytest.mark.django_db
REPO = Path(__file__).resolve().parents[2]


def assert_error(response, status: int, *words: str) -> dict:
    """The one error shape of every endpoint: {"message": ..., "extra": {...}} with the status expected."""
    assert response.status_code == status, response.content[:500]
    body = response.json()
    assert set(body) == {"message", "extra"} and isinstance(body["extra"], dict)
    for word in words:
        assert word in body["message"], body["message"]
    return body


def entry(body: list[dict], name: str) -> dict:
    return next(item for item in body if item["name"] == name)


# --- catalogue -----------------------------------------------------------------------------------


def test_list_shows_every_model_with_its_cached_files(user_client, cached_record):
    response = user_client.get("/api/models/")
    assert response.status_code == 200
    body = response.json()
    from models_registry.catalogue import CATALOGUE

    assert [item["name"] for item in body] == sorted(e.name for e in CATALOGUE)
    small = entry(body, "MiDaS_small")
    (weight_file,) = small["files"]
    assert weight_file["format"] == "pt" and weight_file["size"] == cached_record.size
    assert weight_file["sha256"] == cached_record.sha256 and weight_file["health"] == "ok"
    assert weight_file["health_reason"] == "" and weight_file["node"] == "test-node"
    assert weight_file["last_used_at"] is None and weight_file["size_human"] == "85.7 MB"
    assert small["pinned_sha256"] == "" and small["is_warm"] is False and small["warm"] == []
    assert entry(body, "DPT_Large")["files"] == []


def test_list_shows_files_of_other_nodes_and_warm_workers(user_client, cached_record):
    WeightFile.objects.create(model=cached_record.model, format="h5", path="MiDaS_small/x.h5", size=10,
                              sha256="1" * 64, node="gpu-2", health=Health.CORRUPT, health_reason="bad bytes")
    WarmModel.objects.create(model=cached_record.model, weight_file=cached_record, worker="gpu-2:4242",
                             node="gpu-2", device="cuda:0", dtype="float16")
    small = entry(user_client.get("/api/models/").json(), "MiDaS_small")
    assert [(f["node"], f["format"], f["health"]) for f in small["files"]] == [
        ("gpu-2", "h5", "corrupt"), ("test-node", "pt", "ok")]
    assert small["is_warm"] is True
    assert small["warm"][0]["worker"] == "gpu-2:4242" and small["warm"][0]["device"] == "cuda:0"


@pytest.mark.parametrize("path", ["/api/models/midas-small/", "/api/models/MIDAS_SMALL", "/api/models/MiDaS_small/"])
def test_detail_accepts_aliases_any_case_and_both_slashes(user_client, small_model, path):
    response = user_client.get(path)
    assert response.status_code == 200
    assert response.json()["name"] == "MiDaS_small" and "midas-small" in response.json()["aliases"]


def test_detail_of_an_unknown_model_lists_the_known_ones(user_client):
    body = assert_error(user_client.get("/api/models/ResNet/"), 404, "unknown model 'ResNet'", "MiDaS_small")
    assert body["extra"] == {"field": "model"}


# --- status and cache info -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/models/status", "/api/models/status/"])
def test_status_per_model_with_health_download_progress_and_warm_worker(user_client, cached_record, path):
    cached_record.set_health(Health.CORRUPT, "sha256 differs")
    cached_record.save()
    WeightDownload.objects.create(model=cached_record.model, node="test-node", status=RunStatus.RUNNING,
                                  bytes_done=25, bytes_total=100)
    WeightDownload.objects.create(model=cached_record.model, node="gpu-2", status=RunStatus.FAILED)
    WarmModel.objects.create(model=cached_record.model, worker="host:7", node="test-node", device="cpu",
                             dtype="float32")

    response = user_client.get(path)
    assert response.status_code == 200
    body = response.json()
    assert body["node"] == "test-node" and body["health"] == "1 file(s) need attention"
    assert body["totals"]["files"] == 1 and body["totals"]["bytes"] == cached_record.size
    assert body["totals"]["downloads_active"] == 1
    small = entry(body["models"], "MiDaS_small")
    assert small["health"] == "corrupt" and small["bytes"] == cached_record.size
    assert [(f["format"], f["health"], f["health_reason"]) for f in small["formats"]] == [
        ("pt", "corrupt", "sha256 differs")]
    download = small["download"]
    assert download["status"] == "running" and download["active"] is True and download["node"] == "test-node"
    assert download["bytes_done"] == 25 and download["bytes_total"] == 100 and download["progress"] == 0.25
    assert download["url"].endswith(f"/api/models/downloads/{download['id']}")
    assert [w["worker"] for w in small["warm"]] == ["host:7"]
    dpt = entry(body["models"], "DPT_Large")
    assert dpt["health"] is None and dpt["formats"] == [] and dpt["download"] is None


def test_status_reads_few_queries_whatever_the_catalogue(user_client, cached_record, django_assert_max_num_queries):
    for _ in range(3):
        WeightDownload.objects.create(model=cached_record.model, node="test-node", status=RunStatus.FAILED)
    with django_assert_max_num_queries(8):  # token, user, then the five reads of model_status
        assert user_client.get("/api/models/status").status_code == 200


@pytest.mark.parametrize("path", ["/api/models/cache/info", "/api/models/cache/info/"])
def test_cache_info_is_what_the_cli_prints(user_client, cached_record, path):
    out = io.StringIO()
    call_command("models", "info", "--json", stdout=out)
    cli = json.loads(out.getvalue())
    api = user_client.get(path).json()
    for body in (cli, api):
        body.pop("disk_free")  # the one value that may change between the two calls
    assert api == cli
    assert api["totals"] == {"models": 1, "files": 1, "bytes": cached_record.size}
    assert api["formats"]["pt"] == {"files": 1, "bytes": cached_record.size}


# --- clear ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"confirm": False}, {"model": "MiDaS_small"}])
def test_clear_without_confirm_is_refused_and_deletes_nothing(staff_client, cached_record, body):
    assert_error(staff_client.post("/api/models/cache/clear", body, format="json"), 400, '"confirm": true')
    assert cachefs.absolute(cached_record.path).exists() and WeightFile.objects.count() == 1


def test_clear_one_format_then_everything(staff_client, cached_record):
    path = cachefs.absolute(cached_record.path)
    response = staff_client.post("/api/models/cache/clear/", {"confirm": True, "model": "midas_small",
                                                              "format": "h5"}, format="json")
    assert response.status_code == 200 and response.json() == {
        "files": 0, "bytes": 0, "models": [], "scope": "MiDaS_small [h5]", "node": "test-node", "elsewhere": [],
        "summary": "cleared MiDaS_small [h5]: 0 file(s), 0 B freed on test-node"}
    assert path.exists()

    response = staff_client.post("/api/models/cache/clear", {"confirm": True}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["files"], body["bytes"], body["models"]) == (1, cached_record.size, ["MiDaS_small"])
    assert body["summary"].startswith("cleared every model: 1 file(s), ") and body["summary"].endswith(" on test-node")
    assert not path.exists() and not WeightFile.objects.exists()


def test_clear_names_unknown_models_and_formats(staff_client, small_model):
    assert_error(staff_client.post("/api/models/cache/clear", {"confirm": True, "model": "nope"}, format="json"),
                 404, "unknown model")
    body = assert_error(staff_client.post("/api/models/cache/clear", {"confirm": True, "format": "onnx"},
                                          format="json"), 400, "format:", "unknown format 'onnx'")
    assert body["extra"]["fields"]["format"]


# --- optimize ------------------------------------------------------------------------------------


def test_optimize_plans_by_default_then_does_it(staff_client, cached_record):
    orphan = cachefs.cache_root() / "MiDaS_small" / "stray.bin"
    orphan.write_bytes(b"x" * 1000)

    plan = staff_client.post("/api/models/cache/optimize", {}, format="json").json()
    assert plan["executed"] is False and plan["bytes_to_free"] == 1000
    assert [(item["kind"], item["path"]) for item in plan["items"]] == [("orphan", "MiDaS_small/stray.bin")]
    assert orphan.exists()

    done = staff_client.post("/api/models/cache/optimize/?wait=1", {"dry_run": False}, format="json").json()
    assert done["executed"] is True and done["freed_bytes"] == 1000 and done["errors"] == []
    assert not orphan.exists() and cachefs.absolute(cached_record.path).exists()


def test_optimize_to_a_size_evicts_and_reports(staff_client, cached_record):
    plan = staff_client.post("/api/models/cache/optimize", {"dry_run": True, "max_bytes": 0}, format="json").json()
    assert [(item["kind"], item["model"], item["format"]) for item in plan["items"]] == [("evict", "MiDaS_small", "pt")]
    assert plan["bytes_after"] == 0 and plan["max_bytes"] == 0


@pytest.mark.parametrize("body", [{"max_bytes": -1}, {"max_bytes": "lots"}, {"dry_run": "perhaps"}])
def test_optimize_rejects_bad_input(staff_client, db, body):
    assert_error(staff_client.post("/api/models/cache/optimize", body, format="json"), 400)


# --- download ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_download_is_queued_then_polled_to_completion(staff_client, small_model, mirror, mirror_folder,
                                                      django_capture_on_commit_callbacks):
    # The row is saved, then queued on commit; test settings run the queued task inline.
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post("/api/models/MiDaS_small/download", {}, format="json")
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["active"] is True and job["requested_by"] == "operator"
    assert response["Location"] == job["url"] == f"http://testserver/api/models/downloads/{job['id']}"

    polled = staff_client.get(job["url"]).json()
    assert polled["status"] == "succeeded" and polled["active"] is False and polled["error"] == ""
    assert polled["bytes_done"] == mirror_folder["size"] and polled["progress"] == 1.0
    assert polled["source_url"] == mirror.url_for("midas_v21_small_256.pt")
    weight_file = WeightFile.objects.get(model=small_model)
    assert weight_file.sha256 == mirror_folder["sha256"] and weight_file.health == Health.OK


def test_download_while_one_is_active_is_a_conflict(staff_client, small_model, mirror):
    active = WeightDownload.objects.create(model=small_model, node="test-node", status=RunStatus.QUEUED)
    body = assert_error(staff_client.post("/api/models/midas-small/download", {}, format="json"), 409,
                        "already queued")
    assert body["extra"] == {"download": active.pk}
    assert WeightDownload.objects.count() == 1


def test_download_offline_is_service_unavailable(staff_client, small_model, settings):
    settings.DEPTHSITE_OFFLINE = True
    body = assert_error(staff_client.post("/api/models/MiDaS_small/download", {}, format="json"), 503,
                        "DEPTHSITE_OFFLINE is set")
    assert body["extra"]["offline"] is True and not WeightDownload.objects.exists()


def test_download_failure_is_reported_on_the_job(staff_client, small_model, mirror,
                                                 django_capture_on_commit_callbacks):
    mirror.configure(status=404, status_times=-1)
    with django_capture_on_commit_callbacks(execute=True):
        job = staff_client.post("/api/models/MiDaS_small/download", {"format": "pt"}, format="json").json()
    polled = staff_client.get(f"/api/models/downloads/{job['id']}/").json()
    assert polled["status"] == "failed" and "404" in polled["error"]


def test_download_of_a_disabled_model_and_unknown_jobs_are_not_found(staff_client, small_model):
    small_model.enabled = False
    small_model.save()
    assert_error(staff_client.post("/api/models/MiDaS_small/download", {}, format="json"), 404, "disabled")
    assert_error(staff_client.get("/api/models/downloads/999999"), 404, "no download with id 999999")


# --- verify and convert --------------------------------------------------------------------------


def test_verify_records_health_and_reason(staff_client, cached_small):
    response = staff_client.post("/api/models/MiDaS_small/verify?wait=1", {}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["message"] == "MiDaS_small [pt]: ok"
    assert body["results"][0]["functional_hash"] == WeightFile.objects.get().functional_hash != ""

    path = cachefs.absolute(cached_small.path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    body = staff_client.post("/api/models/MiDaS_small/verify/?wait=1", {"functional": False}, format="json").json()
    assert body["ok"] is False and body["results"][0]["health"] == "corrupt"
    assert "truncated" in body["results"][0]["reason"]
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT and "truncated" in cached_small.health_reason


def test_verify_with_nothing_cached_says_so(staff_client, small_model):
    body = staff_client.post("/api/models/MiDaS_small/verify?wait=1", {}, format="json").json()
    assert body == {"model": "MiDaS_small", "ok": False, "results": [],
                    "message": "no cached files of MiDaS_small on this node to verify"}


def test_convert_adds_a_format_with_the_same_tensors(staff_client, cached_small):
    response = staff_client.post("/api/models/MiDaS_small/convert?wait=1", {"format": "hdf5"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["format"] == "h5" and body["health"] == "ok" and body["content_digest"] == cached_small.content_digest
    assert cachefs.absolute(body["path"]).exists()


def test_convert_errors(staff_client, small_model):
    assert_error(staff_client.post("/api/models/MiDaS_small/convert", {}, format="json"), 400, "format:")
    assert_error(staff_client.post("/api/models/MiDaS_small/convert", {"format": "onnx"}, format="json"), 400,
                 "unknown format")
    assert_error(staff_client.post("/api/models/MiDaS_small/convert", {"format": "h5"}, format="json"), 404,
                 "no healthy cached weights of MiDaS_small")
    assert_error(staff_client.post("/api/models/ResNet/convert", {"format": "h5"}, format="json"), 404,
                 "unknown model")


# --- throttling and doors that must stay light ---------------------------------------------------


def test_writes_are_throttled_with_the_error_shape(staff_client, small_model, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"writes": "2/minute", "uploads": "1/minute"}}
    for _ in range(2):
        assert staff_client.post("/api/models/cache/optimize", {}, format="json").status_code == 200
    body = assert_error(staff_client.post("/api/models/cache/optimize", {}, format="json"), 429, "throttled")
    assert body["extra"]["code"] == "throttled"
    # Reads are not throttled.
    assert staff_client.get("/api/models/status").status_code == 200


LIGHT_REQUESTS = r"""
import os, sys, django
django.setup()
from django.conf import settings
settings.DEPTHSITE_CACHE_DIR = os.environ["TEST_CACHE_DIR"]
from django.test.utils import setup_test_environment
from django.db import connection
setup_test_environment()
connection.creation.create_test_db(verbosity=0)
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient
client = APIClient()
client.force_login(get_user_model().objects.create_superuser("s", "s@example.com", "pw-s-12345"))
codes = [client.get(p).status_code for p in ("/api/models/", "/api/models/MiDaS_small/", "/api/models/status",
                                              "/api/models/cache/info", "/models/", "/models/chart.svg")]
codes.append(client.post("/api/models/cache/optimize", {"dry_run": True}, format="json").status_code)
codes.append(client.post("/api/models/cache/clear", {"confirm": True}, format="json").status_code)
print(codes, "torch" in sys.modules)
"""


@pytest.mark.slow
def test_pages_that_serve_no_model_never_import_torch(tmp_path):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "depthsite.settings.test", "TEST_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", LIGHT_REQUESTS], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[200, 200, 200, 200, 200, 200, 200, 200] False"
