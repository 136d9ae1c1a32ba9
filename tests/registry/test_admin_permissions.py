"""Admin actions honour Django's model permissions: a staff account that may only view the registry can neither
see nor run the actions that delete, convert, verify or export files; one granted the permission still can."""
from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from models_registry import cachefs
from models_registry.choices import Health
from models_registry.models import WeightFile

pytestmark = pytest.mark.django_db

MODEL_ACTIONS = ["verify_models", "convert_to_h5", "clear_models"]
FILE_ACTIONS = ["verify_files", "export_file", "clear_files"]


def _staff(username: str, *codenames: str):
    user = get_user_model().objects.create_user(username, f"{username}@example.com", "pw-staff-12345",
                                                is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="models_registry",
                                                        codename__in=codenames))
    return user


@pytest.fixture
def viewer(client):
    client.force_login(_staff("viewer", "view_registeredmodel", "view_weightfile", "view_weightdownload"))
    return client


def _changelist(model_name: str) -> str:
    return reverse(f"admin:models_registry_{model_name}_changelist")


def _post_action(client, model_name: str, action: str, ids):
    return client.post(_changelist(model_name), {"action": action, "_selected_action": [str(i) for i in ids]})


def _offered(client, model_name: str) -> set[str]:
    page = client.get(_changelist(model_name))
    assert page.status_code == 200  # a viewer may read the list
    form = page.context.get("action_form")
    return {value for value, _ in form.fields["action"].choices} - {""} if form is not None else set()


@pytest.mark.parametrize(("model_name", "actions"), [("registeredmodel", MODEL_ACTIONS),
                                                    ("weightfile", FILE_ACTIONS)])
def test_a_view_only_staff_user_is_offered_no_action(viewer, cached_small, model_name, actions):
    offered = _offered(viewer, model_name)
    assert not offered & set(actions), offered


@pytest.mark.parametrize(("model_name", "action"), [
    *(("registeredmodel", action) for action in MODEL_ACTIONS),
    *(("weightfile", action) for action in FILE_ACTIONS),
])
def test_a_view_only_staff_user_posting_an_action_changes_nothing(viewer, cached_small, model_name, action):
    path = cachefs.absolute(cached_small.path)
    before = path.read_bytes()
    verified_at = cached_small.verified_at
    target = cached_small.model.pk if model_name == "registeredmodel" else cached_small.pk

    response = _post_action(viewer, model_name, action, [target])

    # Not run: no file handed out, the file and its record as they were, no new format cached.
    assert response.status_code in (200, 302, 403)
    assert "attachment" not in response.get("Content-Disposition", "")
    assert path.read_bytes() == before
    assert list(WeightFile.objects.values_list("pk", "format")) == [(cached_small.pk, "pt")]
    cached_small.refresh_from_db()
    assert cached_small.health == Health.OK and cached_small.verified_at == verified_at  # verify stamps it


def test_clearing_a_models_files_asks_what_the_apis_cache_clear_asks(client, cached_small):
    # Deleting model records is not deleting weight files: the model admin's clear asks delete_weightfile, as the API
    # and the dashboard do (models_registry.api.permissions.OPERATOR_PERMISSIONS).
    client.force_login(_staff("recorder", "view_registeredmodel", "delete_registeredmodel"))
    assert "clear_models" not in _offered(client, "registeredmodel")
    _post_action(client, "registeredmodel", "clear_models", [cached_small.model.pk])  # refused: not an offered action
    assert WeightFile.objects.filter(pk=cached_small.pk).exists() and cachefs.absolute(cached_small.path).exists()


def test_a_staff_user_with_delete_permission_can_still_clear(client, cached_small):
    client.force_login(_staff("cleaner", "view_registeredmodel", "delete_weightfile"))
    path = cachefs.absolute(cached_small.path)

    assert "clear_models" in _offered(client, "registeredmodel")
    assert "convert_to_h5" not in _offered(client, "registeredmodel")  # converting needs change
    response = _post_action(client, "registeredmodel", "clear_models", [cached_small.model.pk])

    assert response.status_code == 302
    assert not WeightFile.objects.exists() and not path.exists()


def test_the_export_permission_exports_but_does_not_verify(client, cached_small):
    """Each action asks the permission table, as the API does: change_weightfile is the export permission;
    verifying writes health and needs change_registeredmodel (the Verify action once asked change_weightfile)."""
    client.force_login(_staff("exporter", "view_weightfile", "change_weightfile"))
    before = cached_small.verified_at

    offered = _offered(client, "weightfile")
    assert "export_file" in offered and "verify_files" not in offered and "clear_files" not in offered
    _post_action(client, "weightfile", "verify_files", [cached_small.pk])
    cached_small.refresh_from_db()
    assert cached_small.verified_at == before


def test_a_staff_user_with_the_verify_permission_can_verify_files(client, cached_small):
    client.force_login(_staff("keeper", "view_weightfile", "change_registeredmodel"))
    cachefs.absolute(cached_small.path).write_bytes(b"")

    assert "verify_files" in _offered(client, "weightfile")
    assert {"export_file", "clear_files"}.isdisjoint(_offered(client, "weightfile"))
    response = _post_action(client, "weightfile", "verify_files", [cached_small.pk])

    assert response.status_code == 302
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT


@pytest.mark.parametrize("key", ["verify", "convert", "export", "cache_clear"])
def test_the_admins_answer_as_the_table_for_every_user(key, cached_small):
    from django.contrib.admin.sites import site
    from django.test import RequestFactory

    from models_registry.admin import RegisteredModelAdmin, WeightFileAdmin
    from models_registry.api.permissions import OPERATOR_PERMISSIONS, may_operate
    from models_registry.models import RegisteredModel

    codenames = [p.split(".", 1)[1] for p in OPERATOR_PERMISSIONS[key]]
    users = [_staff(f"u{n}", *perms) for n, perms in enumerate(
        [(), ("view_weightfile",), ("change_weightfile",), ("change_registeredmodel",), ("delete_weightfile",),
         tuple(codenames)])]
    for user in users:
        request = RequestFactory().get("/")
        request.user = user
        for model_admin in (RegisteredModelAdmin(RegisteredModel, site), WeightFileAdmin(WeightFile, site)):
            assert getattr(model_admin, f"has_{key}_permission")(request) == may_operate(user, key), (key, user)
