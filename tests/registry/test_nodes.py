"""Per-node actions: verify, clear and export change or read only this node's cache; another node's rows are
refused in the service's one wording (the command line adds the command to run on that node's machine), and
`models info --node X` shows its records read-only."""
from __future__ import annotations

import html
import io
import json

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.urls import reverse

from models_registry import cachefs
from models_registry.choices import Health
from depthsite.exceptions import ConflictError
from models_registry.models import WeightFile
from models_registry.services.cache import cache_clear
from models_registry.services.verify import weight_verify

pytestmark = pytest.mark.django_db

OTHER = "other"


@pytest.fixture
def other_row(cached_small) -> WeightFile:
    """The same model and format cached on node "other": its file is on that machine, not here."""
    return WeightFile.objects.create(
        model=cached_small.model, format=cached_small.format, node=OTHER, path=f"{cached_small.model.name}/elsewhere.pt",
        size=cached_small.size, sha256=cached_small.sha256, content_digest=cached_small.content_digest,
        dtype=cached_small.dtype, health=Health.OK)


@pytest.fixture
def staff_client(client):
    user = get_user_model().objects.create_superuser("admin", "admin@example.com", "pw-admin-123")
    client.force_login(user)
    return client


def post_action(client, model_name: str, action: str, ids) -> str:
    url = reverse(f"admin:models_registry_{model_name}_changelist")
    response = client.post(url, {"action": action, "_selected_action": [str(i) for i in ids]})
    assert response.status_code in (200, 302)
    return client.get(url).content.decode() if response.status_code == 302 else response.content.decode()


def unchanged(other_row: WeightFile, local: WeightFile) -> None:
    before = (other_row.health, other_row.health_reason, other_row.verified_at)
    other_row.refresh_from_db()
    assert (other_row.health, other_row.health_reason, other_row.verified_at) == before
    assert WeightFile.objects.filter(pk=local.pk).exists() and cachefs.absolute(local.path).is_file()


def refusal(action: str) -> str:
    return f"MiDaS_small [pt] is on node {OTHER}, not on this node (test-node): {action} it on that node's machine"


def test_admin_verify_clear_and_export_refuse_another_nodes_row_in_the_services_words(staff_client, cached_small,
                                                                                      other_row):
    page = html.unescape(post_action(staff_client, "weightfile", "verify_files", [other_row.pk]))
    assert refusal("verify") in page and "manage.py" not in page
    unchanged(other_row, cached_small)  # not marked missing for lack of a file on this machine

    page = html.unescape(post_action(staff_client, "weightfile", "clear_files", [other_row.pk]))
    assert refusal("clear") in page
    unchanged(other_row, cached_small)  # this node's copy of the same model and format is not deleted

    page = html.unescape(post_action(staff_client, "weightfile", "export_file", [other_row.pk]))
    assert refusal("export") in page


@pytest.mark.slow
def test_admin_model_actions_touch_only_this_nodes_files(staff_client, cached_small, other_row):
    page = post_action(staff_client, "registeredmodel", "verify_models", [cached_small.model.pk])
    assert "MiDaS_small [pt]: ok" in page and OTHER not in page  # the same files as `models verify --model`
    unchanged(other_row, cached_small)

    page = html.unescape(post_action(staff_client, "registeredmodel", "clear_models", [cached_small.model.pk]))
    assert ("Cleared MiDaS_small: 1 file(s), 85.7 MB freed on test-node; left alone on node(s) other "
            "(clear them on that node's machine)") in page
    assert not WeightFile.objects.filter(pk=cached_small.pk).exists()
    assert WeightFile.objects.filter(pk=other_row.pk, health=Health.OK).exists()


def test_services_refuse_another_nodes_row(cached_small, other_row):
    with pytest.raises(ConflictError) as verify:
        weight_verify(weight_file=other_row)
    assert verify.value.message == refusal("verify")
    assert verify.value.extra == {"kind": "other_node", "node": OTHER, "this_node": "test-node", "action": "verify",
                                  "model": "MiDaS_small", "format": "pt"}
    with pytest.raises(ConflictError):
        cache_clear(model=cached_small.model, fmt="pt", node=OTHER)
    unchanged(other_row, cached_small)


def cli(*args: str) -> str:
    out = io.StringIO()
    call_command("models", *args, stdout=out)
    return out.getvalue()


def test_cli_info_shows_another_nodes_cache_read_only(cached_small, other_row):
    data = json.loads(cli("info", "--node", OTHER, "--json"))
    assert data["node"] == OTHER and data["read_only"] is True and data["cache_dir"] is None
    paths = [f["path"] for m in data["models"] for f in m["files"]]
    assert paths == [other_row.path]
    text = cli("info", "--node", OTHER)
    assert "Node: other (another node's records, read-only" in text and "Cache Directory" not in text
    local = json.loads(cli("info", "--json"))
    assert local["node"] == "test-node" and "read_only" not in local and local["cache_dir"]
    assert [f["path"] for m in local["models"] for f in m["files"]] == [cached_small.path]


@pytest.mark.parametrize("action", [["verify"], ["clear", "--yes"], ["optimize"], ["download", "--model", "MiDaS_small"]])
def test_cli_actions_refuse_another_node(cached_small, other_row, action):
    err = io.StringIO()
    with pytest.raises((CommandError, SystemExit)) as refused:
        call_command("models", *action, "--node", OTHER, stdout=io.StringIO(), stderr=err)
    err = err.getvalue() + str(refused.value)
    assert f"on node {OTHER}, not on this node (test-node): {action[0]} it on that node's machine; there, run " \
           f"`DEPTHSITE_NODE={OTHER} python manage.py models {action[0]}" in err
    unchanged(other_row, cached_small)


@pytest.mark.parametrize("url,body", [
    ("/api/models/MiDaS_small/verify", {"node": OTHER, "format": "pt"}),
    ("/api/models/cache/clear", {"node": OTHER, "confirm": True, "model": "MiDaS_small"}),
    ("/api/models/cache/optimize", {"node": OTHER, "dry_run": False}),
    ("/api/models/MiDaS_small/download", {"node": OTHER}),
])
def test_api_actions_refuse_another_node_with_a_409_in_the_services_words(staff_client, cached_small,
                                                                           other_row, url, body):
    response = staff_client.post(url, body, content_type="application/json")
    assert response.status_code == 409, response.content[:300]
    error = response.json()
    action = url.rsplit("/", 1)[1]
    assert f"is on node {OTHER}, not on this node (test-node): {action} it on that node's machine" in error["message"]
    assert "--" not in json.dumps(error) and "manage.py" not in json.dumps(error)  # the API speaks no CLI
    assert (error["extra"]["kind"], error["extra"]["node"], error["extra"]["action"]) == ("other_node", OTHER, action)
    unchanged(other_row, cached_small)
    # The node answering is accepted by name.
    if action == "verify":
        # ?wait=1: the synchronous answer (without it the verify is queued as a run, 202).
        assert staff_client.post(url + "?wait=1", {**body, "node": "test-node"}, content_type="application/json").json()["ok"]


def test_api_status_filters_by_node_for_signed_in_readers(staff_client, client, cached_small, other_row, settings):
    settings.DEPTHSITE_PUBLIC_STATUS = True
    other = staff_client.get("/api/models/status", {"node": OTHER}).json()
    small = next(m for m in other["models"] if m["name"] == "MiDaS_small")
    assert other["node"] == OTHER and other["totals"]["files"] == 1 and other["totals"]["disk_free"] is None
    assert [f["path"] for f in small["formats"]] == [other_row.path]
    here = staff_client.get("/api/models/status").json()
    small = next(m for m in here["models"] if m["name"] == "MiDaS_small")
    assert here["node"] == "test-node" and [f["path"] for f in small["formats"]] == [cached_small.path]
    assert here["totals"]["disk_free"] > 0
    assert staff_client.get("/api/models/status", {"node": "no-such-node"}).json()["totals"]["files"] == 0
    assert staff_client.get("/api/models/status", {"node": "../etc"}).status_code == 400
    staff_client.logout()
    # Anonymous readers see no node names, so they cannot ask for one either.
    assert staff_client.get("/api/models/status").status_code == 200
    assert staff_client.get("/api/models/status", {"node": OTHER}).status_code == 403


def test_queued_actions_run_only_on_the_node_they_were_asked_of(small_model, cached_small, settings):
    # The API queues a download or a verify for its own node; a worker of another node that takes the task
    # refuses it (the row says where to run it) instead of acting on its own cache under that node's name.
    from depthsite.choices import RunStatus
    from models_registry.models import ManagementRun, WeightDownload
    from models_registry.services.runs import management_run_execute
    from models_registry.tasks import download_run

    download = WeightDownload.objects.create(model=small_model, node="gpu-9")
    assert download_run(download.pk) == RunStatus.FAILED
    download.refresh_from_db()
    assert download.error_code == "other_node"
    assert download.error == ("MiDaS_small is on node gpu-9, not on this node (test-node): download it on that "
                              "node's machine")
    assert WeightFile.objects.filter(model=small_model).count() == 1  # nothing fetched here

    verified = cached_small.verified_at
    run = ManagementRun.objects.create(kind="verify", model=small_model, node="gpu-9", params={})
    run = management_run_execute(run=run)
    assert run.status == RunStatus.FAILED and run.error_status == 409
    assert run.error == "MiDaS_small is on node gpu-9, not on this node (test-node): verify it on that node's machine"
    cached_small.refresh_from_db()
    assert cached_small.verified_at == verified  # this node's file was not touched

    here = ManagementRun.objects.create(kind="verify", model=small_model, node=settings.DEPTHSITE_NODE, params={})
    assert management_run_execute(run=here).status == RunStatus.SUCCEEDED
