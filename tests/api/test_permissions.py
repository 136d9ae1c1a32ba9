"""Who may do what: reads for signed-in users (or anyone with DEPTHSITE_PUBLIC_STATUS), every write for staff."""
from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from rest_framework.test import APIClient

from models_registry import cachefs
from depthsite.choices import RunStatus
from models_registry.models import WeightDownload, WeightFile

pytestmark = pytest.mark.django_db

# Each write with a body that, for staff, needs no weights and no network: the status says the door let it in.
WRITES = {
    "clear": ("post", "/api/models/cache/clear", {"confirm": True}, 200),
    "optimize": ("post", "/api/models/cache/optimize", {"dry_run": True}, 200),
    "download": ("post", "/api/models/MiDaS_small/download", {}, 202),  # queued on commit, which never comes here
    "verify": ("post", "/api/models/MiDaS_small/verify?wait=1", {}, 200),
    "convert": ("post", "/api/models/MiDaS_small/convert", {"format": "h5"}, 404),  # nothing cached to convert
    "export": ("get", "/api/models/MiDaS_small/export?format=pt", None, 404),
    "import": ("post", "/api/models/import", "multipart", 422),  # not a weight file
}
READS = ["/api/models/", "/api/models/MiDaS_small/", "/api/models/status", "/api/models/cache/info",
         "/api/models/downloads/{download}"]
EXPECTED = {"anonymous": 401, "user": 403}


def send(client: APIClient, method: str, path: str, body):
    if body == "multipart":
        upload = SimpleUploadedFile("notes.txt", b"these are not weights\n", content_type="text/plain")
        return client.post(path, {"file": upload}, format="multipart")
    if method == "get":
        return client.get(path)
    return client.post(path, body, format="json")


@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
@pytest.mark.parametrize("action", list(WRITES))
def test_write_permission_matrix(clients, small_model, who, action):
    method, path, body, staff_status = WRITES[action]
    response = send(clients[who], method, path, body)
    expected = EXPECTED.get(who, staff_status)
    assert response.status_code == expected, response.content[:300]
    payload = response.json()
    if who != "staff" or staff_status >= 400:
        # Every refusal, and staff's own 4xx answers, is the one error body the API uses.
        assert {"message", "extra"} <= set(payload) and payload["message"], payload
    else:
        # What staff are let through to is the action's own answer, not an error wearing a 2xx.
        assert "message" not in payload or "extra" not in payload, payload
    if who == "anonymous":
        assert payload["message"] == "Authentication credentials were not provided."
        assert response["WWW-Authenticate"] == "Token"
    elif who == "user":
        assert payload["message"] == "only staff users may change the model cache or export weights"
    if action == "download":
        assert WeightDownload.objects.exists() is (who == "staff")


@pytest.mark.parametrize("action", list(WRITES))
def test_public_status_opens_no_write(anon_client, small_model, settings, action):
    settings.DEPTHSITE_PUBLIC_STATUS = True
    method, path, body, _ = WRITES[action]
    assert send(anon_client, method, path, body).status_code == 401


@pytest.mark.parametrize("who", ["anonymous", "user"])
def test_refused_clear_and_optimize_delete_nothing(clients, cached_record, who):
    stray = cachefs.cache_root() / "MiDaS_small" / "stray.bin"
    stray.write_bytes(b"x")
    clients[who].post("/api/models/cache/clear", {"confirm": True}, format="json")
    clients[who].post("/api/models/cache/optimize", {"dry_run": False}, format="json")
    assert cachefs.absolute(cached_record.path).exists() and stray.exists()
    assert WeightFile.objects.count() == 1


@pytest.mark.parametrize("public", [False, True])
@pytest.mark.parametrize("who", ["anonymous", "user", "staff"])
def test_read_permission_matrix(clients, small_model, settings, who, public):
    settings.DEPTHSITE_PUBLIC_STATUS = public
    download = WeightDownload.objects.create(model=small_model, node="test-node", status=RunStatus.FAILED)
    for path in READS:
        response = clients[who].get(path.format(download=download.pk))
        expected = 401 if who == "anonymous" and not public else 200
        assert response.status_code == expected, (path, response.content[:200])


def test_session_writes_need_the_csrf_token(operator):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(operator)
    refused = client.post("/api/models/cache/optimize", {"dry_run": True}, format="json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["message"]

    page = client.get("/models/")  # the dashboard sets the cookie its buttons send back
    token = page.cookies["csrftoken"].value
    accepted = client.post("/api/models/cache/optimize", {"dry_run": True}, format="json", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 200 and accepted.json()["executed"] is False


def test_a_token_from_drf_create_token_authenticates_a_script(operator):
    out = io.StringIO()
    call_command("drf_create_token", "operator", stdout=out)
    key = re.search(r"Generated token (\w+) for user operator", out.getvalue()).group(1)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.post("/api/models/cache/optimize", {}, format="json").status_code == 200
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-key")
    response = client.get("/api/models/status")
    assert response.status_code == 401 and response.json()["message"] == "Invalid token."


def test_inactive_staff_cannot_write(operator):
    client = APIClient()
    client.force_login(operator)
    get_user_model().objects.filter(pk=operator.pk).update(is_active=False)
    assert client.post("/api/models/cache/optimize", {}, format="json").status_code == 401
