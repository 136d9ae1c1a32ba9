"""What a person sees when a download cannot happen: one line naming what failed, the host tried and the ways out,
a stable code for scripts and the API, and no retries for failures that cannot heal (DNS, TLS, 404)."""
from __future__ import annotations

import json
import socket

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from models_registry import fetch
from depthsite.choices import RunStatus
from depthsite.exceptions import DownloadError
from models_registry.models import WeightDownload, WeightFile
from models_registry.services.download import weight_download
from depthsite.testing.weightserver import WeightServer
from tests.support.operators import grant_operator_permissions

WAYS_OUT = ("DEPTHSITE_MODEL_MIRROR", "import a file you have", "work from the cache only (DEPTHSITE_OFFLINE)")


@pytest.fixture
def attempts(monkeypatch):
    """Counts the connections a download opens, or tries to (urllib3's own connect function: every attempt,
    including the retries urllib3 makes itself, passes through it)."""
    import urllib3.util.connection as connection

    made: list[tuple] = []
    real = connection.create_connection

    def counting(address, *args, **kwargs):
        made.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(connection, "create_connection", counting)
    monkeypatch.setattr(fetch, "RETRY_BACKOFF_SECONDS", 0.01)
    return made


@pytest.fixture
def closed_port() -> int:
    # A port that was just bound and released on loopback: nothing listens there, connections are refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _one_line_with_ways_out(message: str, *, cli: bool = False) -> None:
    assert "\n" not in message
    for way in WAYS_OUT:
        assert way in message
    assert "Max retries" not in message and "HTTPConnectionPool" not in message
    # The row and the API carry the ways out in words for everyone; the command line adds its own commands.
    assert ("python manage.py models import PATH --model MiDaS_small" in message) == cli
    assert ("--offline" in message) == cli


def test_unresolvable_host_fails_at_once_with_dns_code(small_model, settings, attempts):
    settings.DEPTHSITE_MODEL_MIRROR = "http://user:secret@weights.nonexistent.invalid/models"

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    error = caught.value
    assert len(attempts) == 1  # a name that does not resolve is not retried
    assert error.extra["code"] == "download_dns"
    assert "weights.nonexistent.invalid does not resolve (DNS)" in error.message
    assert "tried weights.nonexistent.invalid" in error.message
    assert "secret" not in error.message and "secret" not in json.dumps(error.extra)
    _one_line_with_ways_out(error.message)
    row = WeightDownload.objects.get(model=small_model)
    assert row.status == RunStatus.FAILED and row.error_code == "download_dns" and row.error == error.message


def test_closed_port_is_retried_then_named_unreachable(small_model, settings, attempts, closed_port):
    settings.DEPTHSITE_MODEL_MIRROR = f"http://127.0.0.1:{closed_port}"

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    assert len(attempts) == fetch.RETRY_ATTEMPTS  # refused may heal (a server restarting): retried
    assert caught.value.extra["code"] == "download_unreachable"
    assert caught.value.extra["host"] == f"127.0.0.1:{closed_port}"
    assert f"cannot connect to 127.0.0.1:{closed_port}" in caught.value.message
    assert f"after {fetch.RETRY_ATTEMPTS} failed attempts" in caught.value.message
    _one_line_with_ways_out(caught.value.message)


def test_tls_to_a_plain_http_server_is_not_retried(small_model, settings, attempts, tmp_path):
    with WeightServer(tmp_path) as server:
        settings.DEPTHSITE_MODEL_MIRROR = server.url.replace("http://", "https://")
        with pytest.raises(DownloadError) as caught:
            weight_download(model=small_model)
    assert len(attempts) == 1
    assert caught.value.extra["code"] == "download_tls"
    _one_line_with_ways_out(caught.value.message)


@pytest.mark.parametrize(("status", "code", "tries"), [
    (404, "download_http_404", 1),
    (503, "download_http_5xx", fetch.RETRY_ATTEMPTS),
])
def test_http_status_has_its_code_and_retries_only_when_it_may_heal(small_model, settings, attempts, tmp_path,
                                                                   status, code, tries):
    with WeightServer(tmp_path) as server:
        server.configure(status=status, status_times=-1)
        settings.DEPTHSITE_MODEL_MIRROR = server.url
        with pytest.raises(DownloadError) as caught:
            weight_download(model=small_model)
        assert len(server.gets()) == tries  # what the server saw; kept-alive connections carry several
    assert caught.value.extra["code"] == code and caught.value.extra["status"] == status
    assert f"answered {status}" in caught.value.message
    _one_line_with_ways_out(caught.value.message)
    assert not WeightFile.objects.exists()


def test_cli_says_it_in_one_line_and_json_carries_the_code(small_model, settings, attempts, capsys):
    settings.DEPTHSITE_MODEL_MIRROR = "http://weights.nonexistent.invalid"

    with pytest.raises(Exception) as caught:
        call_command("models", "download", "--model", "MiDaS_small", "--json")

    payload = json.loads(capsys.readouterr().out)
    assert payload["error"]["code"] == "download_dns"
    _one_line_with_ways_out(payload["error"]["message"], cli=True)
    assert payload["error"]["hint"] == ("here: `python manage.py models import PATH --model MiDaS_small` imports a "
                                        "file you have, `--offline` works from the cache only")
    assert "does not resolve" in str(caught.value)


def test_api_job_and_dashboard_status_carry_message_and_code(small_model, settings, attempts,
                                                            django_capture_on_commit_callbacks):
    settings.DEPTHSITE_MODEL_MIRROR = "http://weights.nonexistent.invalid"
    operator = get_user_model().objects.create_user("op", "op@example.com", "pw-op-12345", is_staff=True)
    grant_operator_permissions(operator)  # downloading needs models_registry.change_registeredmodel
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=operator).key}")

    with django_capture_on_commit_callbacks(execute=True):
        job = client.post("/api/models/MiDaS_small/download", {}, format="json").json()
    polled = client.get(job["url"]).json()

    assert polled["status"] == "failed" and polled["error_code"] == "download_dns"
    _one_line_with_ways_out(polled["error"])
    status = client.get("/api/models/status").json()  # what the dashboard polls
    shown = next(m for m in status["models"] if m["name"] == "MiDaS_small")["download"]
    assert shown["error_code"] == "download_dns" and "does not resolve" in shown["error"]
