"""Admin pages and actions as a staff user: the same services as the CLI behind every button."""
from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from models_registry import cachefs
from models_registry.choices import Health
from models_registry.formats import content_digest, read_weights
from models_registry.models import RegisteredModel, WeightFile

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    user = get_user_model().objects.create_superuser("admin", "admin@example.com", "pw-admin-123")
    client.force_login(user)
    return client


def post_action(client, model_name: str, action: str, ids) -> object:
    url = reverse(f"admin:models_registry_{model_name}_changelist")
    return client.post(url, {"action": action, "_selected_action": [str(i) for i in ids]}, follow=False)


def test_model_list_and_change_page_show_files_inline(staff_client, cached_small):
    listing = staff_client.get(reverse("admin:models_registry_registeredmodel_changelist"))
    assert listing.status_code == 200
    assert b"MiDaS_small" in listing.content and b"pt (ok)" in listing.content
    page = staff_client.get(reverse("admin:models_registry_registeredmodel_change", args=[cached_small.model.pk]))
    assert page.status_code == 200
    assert b"85.7 MB" in page.content and b"midas_v21_small_256.pt" in page.content


def test_weight_file_list_has_filters_and_human_sizes(staff_client, cached_small):
    page = staff_client.get(reverse("admin:models_registry_weightfile_changelist") + "?health__exact=ok")
    assert page.status_code == 200
    assert b"85.7 MB" in page.content and b"test-node" in page.content
    for label in (b"By format", b"By health", b"By node"):
        assert label in page.content


def test_convert_action_adds_a_format(staff_client, cached_small):
    response = post_action(staff_client, "registeredmodel", "convert_to_h5", [cached_small.model.pk])
    assert response.status_code == 302
    h5 = WeightFile.objects.get(format="h5")
    assert h5.content_digest == cached_small.content_digest and h5.health == Health.OK


def test_verify_action_reports_a_corrupt_file(staff_client, cached_small):
    cachefs.absolute(cached_small.path).write_bytes(b"")
    response = post_action(staff_client, "weightfile", "verify_files", [cached_small.pk])
    assert response.status_code == 302
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT
    page = staff_client.get(response["Location"])
    assert b"empty file" in page.content


def test_export_action_downloads_the_file(staff_client, cached_small):
    response = post_action(staff_client, "weightfile", "export_file", [cached_small.pk])
    assert response.status_code == 200
    assert 'attachment; filename="midas_v21_small_256.pt"' in response["Content-Disposition"]
    body = b"".join(response.streaming_content)
    assert body == cachefs.absolute(cached_small.path).read_bytes()
    assert response["ETag"] == f'"{cached_small.sha256}"'


def test_export_of_a_converted_format_streams_and_leaves_no_temp(staff_client, cached_small, tmp_path):
    h5 = WeightFile.objects.create(model=cached_small.model, format="h5", path="MiDaS_small/gone.h5", size=1,
                                   sha256="0" * 64, node="test-node", health=Health.MISSING)
    response = post_action(staff_client, "weightfile", "export_file", [h5.pk])
    assert response.status_code == 200
    target = tmp_path / "out.h5"
    target.write_bytes(b"".join(response.streaming_content))
    assert content_digest(read_weights(target).arrays) == cached_small.content_digest
    assert not list((cachefs.cache_root() / ".exports").iterdir())


def test_clear_action_removes_files_and_records(staff_client, cached_small):
    path = cachefs.absolute(cached_small.path)
    response = post_action(staff_client, "registeredmodel", "clear_models", [cached_small.model.pk])
    assert response.status_code == 302
    assert not WeightFile.objects.exists() and not path.exists()


def test_admin_can_add_a_custom_entry(staff_client):
    response = staff_client.post(reverse("admin:models_registry_registeredmodel_add"), {
        "name": "small_finetuned", "display_name": "Fine-tuned small", "architecture": "MiDaS_small",
        "aliases": "[]", "file_name": "small_finetuned.pt", "license": "MIT", "input_size": 256,
        "preprocessing": "{}", "enabled": "on", "semantics": "relative inverse depth",
        "source_url": "", "description": "", "expected_sha256": "", "expected_content_digest": "",
        "weight_files-TOTAL_FORMS": "0", "weight_files-INITIAL_FORMS": "0",
    })
    assert response.status_code == 302, response.content[:2000]
    assert RegisteredModel.objects.get(name="small_finetuned").architecture == "MiDaS_small"


def test_admin_actions_need_staff(client, cached_small):
    response = post_action(client, "registeredmodel", "clear_models", [cached_small.model.pk])
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert WeightFile.objects.exists()
