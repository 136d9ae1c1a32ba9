"""Registry operations need the Django model permission the admin action of the same kind needs, not just is_staff:
a staff account that may only view the registry can neither clear, optimize, download, verify, convert, import
nor export through the API, and the dashboard offers it no button; one granted the permission (or a superuser) can.
"""
from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from models_registry import cachefs
from models_registry.models import WeightDownload, WeightFile
from tests.api.test_permissions import send

pytestmark = pytest.mark.django_db

# Each write, with a body that needs no weights and no network, the status an allowed caller gets, and the one
# permission it needs (the admin's: "delete" on weight files for what deletes them, "change" for the rest).
WRITES = {
    "clear": ("post", "/api/models/cache/clear", {"confirm": True}, 200, "models_registry.delete_weightfile"),
    "optimize": ("post", "/api/models/cache/optimize", {"dry_run": True}, 200, "models_registry.delete_weightfile"),
    "download": ("post", "/api/models/MiDaS_small/download", {}, 202, "models_registry.change_registeredmodel"),
    "verify": ("post", "/api/models/MiDaS_small/verify?wait=1", {}, 200, "models_registry.change_registeredmodel"),
    "convert": ("post", "/api/models/MiDaS_small/convert", {"format": "h5"}, 404,
                "models_registry.change_registeredmodel"),  # nothing cached to convert: let in, then 404
    "export": ("get", "/api/models/MiDaS_small/export?format=pt", None, 404, "models_registry.change_weightfile"),
    "import": ("post", "/api/models/import", "multipart", 422, "models_registry.change_registeredmodel"),
}
REGISTRY_VIEW = ("models_registry.view_registeredmodel", "models_registry.view_weightfile",
                 "models_registry.view_weightdownload")
REGISTRY_WRITE = ("models_registry.delete_weightfile", "models_registry.change_weightfile",
                  "models_registry.change_registeredmodel", "models_registry.delete_registeredmodel",
                  "models_registry.add_weightfile", "models_registry.add_registeredmodel")


def _staff(username: str, *perms: str):
    user = get_user_model().objects.create_user(username, f"{username}@example.com", "pw-staff-12345", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return user


def _client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def viewer():
    """The account of the review: staff, allowed to view the registry and jobs, nothing more."""
    return _staff("viewer", *REGISTRY_VIEW, "inference.view_depthjob")


@pytest.mark.parametrize("action", list(WRITES))
def test_a_view_only_staff_user_is_refused_every_write_with_the_error_body(viewer, small_model, action):
    method, path, body, _, perm = WRITES[action]
    response = send(_client(viewer), method, path, body)
    assert response.status_code == 403, response.content[:300]
    payload = response.json()
    assert set(payload) == {"message", "extra"} and perm in payload["message"], payload
    assert not WeightDownload.objects.exists()


def test_a_view_only_staff_user_can_neither_clear_nor_optimize_away_a_file(viewer, cached_record):
    stray = cachefs.cache_root() / "MiDaS_small" / "stray.bin"
    stray.write_bytes(b"x")
    client = _client(viewer)
    assert client.post("/api/models/cache/clear", {"confirm": True}, format="json").status_code == 403
    assert client.post("/api/models/cache/optimize", {"dry_run": False, "max_bytes": 0},
                       format="json").status_code == 403
    assert cachefs.absolute(cached_record.path).exists() and stray.exists()
    assert WeightFile.objects.count() == 1


def test_a_view_only_staff_user_cannot_export_a_cached_file(viewer, cached_record):
    response = _client(viewer).get("/api/models/MiDaS_small/export?format=pt")
    assert response.status_code == 403 and "attachment" not in response.get("Content-Disposition", "")
    assert response.json()["message"]


@pytest.mark.parametrize("action", list(WRITES))
def test_each_write_needs_its_own_permission_not_another(small_model, action):
    """Every other write permission of the registry is not enough: only the one the table names lets it in."""
    method, path, body, _, perm = WRITES[action]
    others = [p for p in REGISTRY_WRITE if p != perm]
    response = send(_client(_staff("almost", *REGISTRY_VIEW, *others)), method, path, body)
    assert response.status_code == 403, response.content[:300]
    assert not WeightDownload.objects.exists()


@pytest.mark.parametrize("action", list(WRITES))
def test_staff_with_the_permission_are_let_in(small_model, action):
    method, path, body, status, perm = WRITES[action]
    response = send(_client(_staff("holder", perm)), method, path, body)
    assert response.status_code == status, response.content[:300]
    if action == "download":
        assert WeightDownload.objects.exists()


@pytest.mark.parametrize("action", list(WRITES))
def test_superusers_hold_every_permission(small_model, action):
    method, path, body, status, _ = WRITES[action]
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    assert send(_client(root), method, path, body).status_code == status


def test_staff_with_the_delete_permission_clear_the_cache(cached_record):
    client = _client(_staff("cleaner", "models_registry.delete_weightfile"))
    response = client.post("/api/models/cache/clear", {"confirm": True}, format="json")
    assert response.status_code == 200, response.content[:300]
    assert not WeightFile.objects.exists() and not cachefs.absolute(cached_record.path).exists()


def test_a_permission_without_is_staff_is_not_enough(small_model):
    user = get_user_model().objects.create_user("notstaff", "n@example.com", "pw-not-12345")
    user.user_permissions.add(Permission.objects.get(codename="delete_weightfile"))
    response = _client(user).post("/api/models/cache/clear", {"confirm": True}, format="json")
    assert response.status_code == 403


# --- the dashboard -------------------------------------------------------------------------------

BUTTONS = {"download": "download", "verify": "verify", "convert": "convert", "export": "export", "clear": "clear",
           "optimize-plan": "optimize", "optimize-run": "optimize"}


def _buttons(client, user) -> set[str]:
    client.force_login(user)
    html = client.get("/models/").content.decode()
    return set(re.findall(r'data-action="([\w-]+)"', html))


def test_a_view_only_staff_user_sees_no_action_button(client, viewer, small_model):
    assert _buttons(client, viewer) == set()


@pytest.mark.parametrize("perm", sorted({WRITES[a][4] for a in WRITES}))
def test_the_dashboard_shows_the_buttons_the_permission_allows(client, small_model, perm):
    shown = _buttons(client, _staff("holder", perm))
    allowed = {button for button, action in BUTTONS.items() if WRITES[action][4] == perm}
    assert shown == allowed


def test_superusers_see_every_button(client, small_model):
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    assert _buttons(client, root) == set(BUTTONS)


# --- one table, the admin's permissions ------------------------------------------------------------


def test_the_table_names_the_permissions_these_tests_and_the_admin_use():
    from models_registry import admin as registry_admin
    from models_registry.api.permissions import OPERATOR_PERMISSIONS
    from models_registry.models import RegisteredModel, WeightFile as WeightFileModel

    table = {"clear": "cache_clear", "optimize": "cache_optimize", "download": "download", "verify": "verify",
             "convert": "convert", "export": "export", "import": "import"}
    for action, name in table.items():
        assert OPERATOR_PERMISSIONS[name] == (WRITES[action][4],), action

    # Every action of the registry's admins asks the table by its key (models_registry.admin), never a model
    # permission of its own: the weight file Verify action once asked change_weightfile, the export permission.
    expected = {"clear_files": "cache_clear", "export_file": "export", "verify_files": "verify",
                "verify_models": "verify", "clear_models": "cache_clear"}
    for model_admin in (registry_admin.RegisteredModelAdmin, registry_admin.WeightFileAdmin):
        for action in model_admin.actions:
            name = action.__name__
            want = "convert" if name.startswith("convert_to_") else expected[name]
            assert tuple(action.allowed_permissions) == (want,), name
            assert hasattr(model_admin, f"has_{want}_permission"), name


# --- the results of background runs --------------------------------------------------------------

# A run's result names files and paths: reading it needs the permission of the action that queued it.
RUNS = {"verify": "verify", "convert": "convert", "optimize": "optimize"}  # run kind -> WRITES key


def _run(kind: str, model):
    from models_registry.models import ManagementRun

    return ManagementRun.objects.create(kind=kind, model=None if kind == "optimize" else model, node="test-node",
                                        status="succeeded", result={"path": "/var/cache/depthsite/x.pt"})


@pytest.mark.parametrize("kind", list(RUNS))
def test_a_run_needs_the_permission_of_its_action(small_model, viewer, kind):
    run = _run(kind, small_model)
    url = f"/api/models/runs/{run.pk}"
    perm = WRITES[RUNS[kind]][4]
    response = _client(viewer).get(url)
    assert response.status_code == 403 and perm in response.json()["message"], response.content[:300]
    assert "/var/cache" not in response.content.decode()
    others = [p for p in REGISTRY_WRITE if p != perm]
    assert _client(_staff("almost", *REGISTRY_VIEW, *others)).get(url).status_code == 403
    response = _client(_staff("holder", perm)).get(url)
    assert response.status_code == 200 and response.json()["result"] == {"path": "/var/cache/depthsite/x.pt"}


def test_runs_keep_their_other_answers(small_model, viewer):
    run = _run("verify", small_model)
    url = f"/api/models/runs/{run.pk}"
    reader = get_user_model().objects.create_user("reader2", "r2@example.com", "pw-reader-12345")
    reader.user_permissions.add(Permission.objects.get(codename="change_registeredmodel"))
    assert _client(reader).get(url).status_code == 403  # not staff
    assert APIClient().get(url).status_code == 401
    assert _client(_staff("holder", "models_registry.change_registeredmodel")).get(
        "/api/models/runs/999999").status_code == 404
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    assert _client(root).get(url).status_code == 200


def test_a_staff_user_without_a_run_permission_cannot_probe_which_runs_exist(small_model, viewer):
    # 403 for an existing run and for a missing one alike: the ids cannot be enumerated.
    run = _run("verify", small_model)
    client = _client(viewer)
    here, missing = client.get(f"/api/models/runs/{run.pk}"), client.get("/api/models/runs/999999")
    assert here.status_code == missing.status_code == 403, (here.content[:300], missing.content[:300])
    assert here.json() == missing.json()
    for perm in ("models_registry.change_registeredmodel", "models_registry.delete_weightfile"):
        assert perm in missing.json()["message"]
    assert "/var/cache" not in here.content.decode()
    # Holding one run action's permission: a missing run is missing, another kind's run is still refused.
    holder = _client(_staff("optimizer", "models_registry.delete_weightfile"))
    assert holder.get("/api/models/runs/999999").status_code == 404
    response = holder.get(f"/api/models/runs/{run.pk}")
    assert response.status_code == 403 and "models_registry.change_registeredmodel" in response.json()["message"]


def test_an_unknown_action_is_refused_in_words():
    from models_registry.api.permissions import missing_permission_message

    message = missing_permission_message("no_such_action")
    assert message == "this action is not open to staff accounts"
    assert "unknown" not in missing_permission_message("") and "()" not in missing_permission_message("")
    assert "models_registry.change_registeredmodel" in missing_permission_message("verify")


def test_every_run_kind_names_an_operator_action():
    from models_registry.api.permissions import OPERATOR_PERMISSIONS, RUN_ACTIONS
    from models_registry.models import ManagementRun

    assert set(RUN_ACTIONS) == set(ManagementRun.Kind.values)
    assert all(action in OPERATOR_PERMISSIONS for action in RUN_ACTIONS.values())
