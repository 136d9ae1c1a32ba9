"""Licences: shown on every surface, recorded with each cached file, and DEPTHSITE_ACCEPTED_LICENSES refusing
weights on every path that would use or fetch them (jobs, predict, download, import, export)."""
from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient

from inference.models import DepthJob
from models_registry import cachefs
from depthsite.exceptions import LicenseError
from models_registry.models import RegisteredModel, WeightDownload, WeightFile
from models_registry.services.download import weight_download
from models_registry.services.resolve import weights_resolve
from models_registry.services.licences import license_accepted, model_license_check
from models_registry.services.imports import weight_import
from depthsite.testing import images
from tests.support.operators import grant_operator_permissions

pytestmark = pytest.mark.django_db
SETTING = "DEPTHSITE_ACCEPTED_LICENSES"


@pytest.fixture
def commercial_only(settings):
    settings.DEPTHSITE_ACCEPTED_LICENSES = ["MIT", "Apache-2.0"]


@pytest.fixture
def non_commercial_small(small_model):
    """MiDaS_small relabelled CC-BY-NC-4.0: a non-commercial model small enough to run here."""
    small_model.license = "CC-BY-NC-4.0"
    small_model.save()
    return small_model


@pytest.fixture
def staff():
    user = get_user_model().objects.create_user("boss", "boss@example.com", "pw-boss-123", is_staff=True)
    grant_operator_permissions(user)  # the registry's writes need their model permissions
    client = APIClient()
    client.force_authenticate(user)
    return client


def assert_names_licence_and_setting(message: str):
    assert "CC-BY-NC-4.0" in message and SETTING in message, message


def run_cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, the error line) of a command, as RegistryCommand reports a domain error."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(*args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue() + str(exc)
    return 0, out.getvalue(), err.getvalue()


def test_default_accepts_every_licence(settings):
    for value in ([], ["*"], "", None):
        settings.DEPTHSITE_ACCEPTED_LICENSES = value
        assert license_accepted("CC-BY-NC-4.0") and license_accepted("")
    settings.DEPTHSITE_ACCEPTED_LICENSES = ["mit", "Apache-2.0"]
    assert license_accepted("MIT") and license_accepted("apache-2.0") and not license_accepted("CC-BY-NC-4.0")


def test_refusal_is_a_403_naming_the_licence_and_the_setting(commercial_only):
    model = RegisteredModel.objects.get(name="Depth_Anything_V2_Base")
    with pytest.raises(LicenseError) as caught:
        model_license_check(model=model)
    assert caught.value.status == 403 and caught.value.exit_code != 0
    assert_names_licence_and_setting(caught.value.message)
    assert caught.value.extra["license"] == "CC-BY-NC-4.0" and caught.value.extra["setting"] == SETTING
    model_license_check(model=RegisteredModel.objects.get(name="Depth_Anything_V2_Small"))  # Apache-2.0 passes


def assert_names_licence_not_the_setting(message: str):
    """What an uploader reads: the model's licence, never the deployment's setting or what it holds."""
    assert "CC-BY-NC-4.0" in message and "MiDaS_small" in message, message
    assert SETTING not in message and "Apache-2.0" not in message and "DEPTHSITE_" not in message, message


def test_job_creation_is_refused_before_anything_is_stored(cached_small, non_commercial_small, commercial_only,
                                                          settings, client):
    api = APIClient()
    api.force_authenticate(get_user_model().objects.create_user("u", "u@example.com", "pw-u-12345"))
    photo = SimpleUploadedFile("photo.jpg", images.jpeg(), content_type="image/jpeg")
    response = api.post("/api/predictions/", {"image": photo, "model": "MiDaS_small"}, format="multipart")
    assert response.status_code == 403, response.content
    assert_names_licence_not_the_setting(response.json()["message"])
    extra = response.json()["extra"]
    assert extra["field"] == "model" and extra["license"] == "CC-BY-NC-4.0"
    assert "accepted" not in extra and "setting" not in extra

    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    anonymous = APIClient()
    photo = SimpleUploadedFile("photo.jpg", images.jpeg(), content_type="image/jpeg")
    response = anonymous.post("/api/predictions/", {"image": photo, "model": "MiDaS_small"}, format="multipart")
    assert response.status_code == 403, response.content
    assert_names_licence_not_the_setting(str(response.json()))
    photos = [SimpleUploadedFile(name, images.jpeg(), content_type="image/jpeg") for name in ("a.jpg", "b.jpg")]
    response = anonymous.post("/api/predictions/batch", {"images": photos, "model": "MiDaS_small"},
                              format="multipart")
    assert response.status_code == 403, response.content
    assert_names_licence_not_the_setting(str(response.json()))

    photo = SimpleUploadedFile("photo.jpg", images.jpeg(), content_type="image/jpeg")
    page = client.post("/", {"image": photo, "model": "MiDaS_small", "colormap": "inferno", "outputs": ["png"]})
    assert page.status_code == 403  # the form again, with the message under the model field
    assert_names_licence_not_the_setting(" ".join(page.context["form"].errors["model"]))
    photos = [SimpleUploadedFile(name, images.jpeg(), content_type="image/jpeg") for name in ("a.jpg", "b.jpg")]
    page = client.post("/batch/", {"images": photos, "model": "MiDaS_small", "colormap": "inferno",
                                   "outputs": ["png"]})
    assert page.status_code == 403
    assert_names_licence_not_the_setting(" ".join(page.context["form"].errors["model"]))
    assert not DepthJob.objects.exists()
    uploads = settings.MEDIA_ROOT / "uploads"
    assert not uploads.exists() or not any(path.is_file() for path in uploads.rglob("*"))


def test_predict_and_job_runs_refuse_cached_weights(cached_small, non_commercial_small, commercial_only, tmp_path):
    with pytest.raises(LicenseError):
        weights_resolve(model=non_commercial_small)  # what every estimator (predict, job workers) goes through
    image = tmp_path / "photo.jpg"
    image.write_bytes(images.jpeg())
    code, out, err = run_cli("predict", str(image), "--model", "MiDaS_small", "--output", str(tmp_path / "out"))
    assert code != 0 and out == ""
    assert_names_licence_and_setting(err)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_downloads_are_refused_before_touching_the_network(non_commercial_small, commercial_only, staff, settings):
    settings.DEPTHSITE_MODEL_MIRROR = "http://127.0.0.1:9/"  # nothing listens: reaching it would be another error
    with pytest.raises(LicenseError):
        weight_download(model=non_commercial_small)
    response = staff.post("/api/models/MiDaS_small/download")
    assert response.status_code == 403
    assert_names_licence_and_setting(response.json()["message"])
    code, _, err = run_cli("models", "download", "--model", "MiDaS_small")
    assert code != 0
    assert_names_licence_and_setting(err)
    assert not WeightDownload.objects.exists()


def test_imports_are_refused_and_leave_nothing(non_commercial_small, commercial_only, small_pt, staff):
    with pytest.raises(LicenseError):
        weight_import(path=small_pt)
    code, _, err = run_cli("models", "import", str(small_pt))
    assert code != 0
    assert_names_licence_and_setting(err)
    with open(small_pt, "rb") as handle:
        response = staff.post("/api/models/import", {"file": handle}, format="multipart")
    assert response.status_code == 403, response.content
    assert not WeightFile.objects.exists()
    root = cachefs.cache_root()
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_exports_are_refused(cached_small, non_commercial_small, commercial_only, staff, tmp_path):
    response = staff.get("/api/models/MiDaS_small/export?format=pt")
    assert response.status_code == 403
    assert_names_licence_and_setting(response.json()["message"])
    out = tmp_path / "exports"
    out.mkdir()
    code, _, err = run_cli("models", "export", "--model", "MiDaS_small", "--output", str(out), "--format", "pt")
    assert code != 0 and not list(out.iterdir())
    assert_names_licence_and_setting(err)


def test_each_cached_file_records_its_licence(cached_small, staff):
    assert cached_small.license == "MIT"
    model = cached_small.model
    model.license = "CC-BY-NC-4.0"  # relabelled later: the file keeps what it was cached under
    model.save()
    cached_small.refresh_from_db()
    assert cached_small.license == "MIT"
    body = staff.get("/api/models/MiDaS_small/").json()
    assert body["license"] == "CC-BY-NC-4.0" and body["files"][0]["license"] == "MIT"
    code, out, _ = run_cli("models", "list", "--json")
    small = next(row for row in json.loads(out) if row["name"] == "MiDaS_small")
    assert small["cached"][0]["license"] == "MIT"


def test_every_surface_shows_licences_and_refusals(commercial_only, staff, client, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = settings.DEPTHSITE_PUBLIC_STATUS = True
    listed = {row["name"]: row for row in staff.get("/api/models/").json()}
    assert listed["Depth_Anything_V2_Base"]["license"] == "CC-BY-NC-4.0"
    assert listed["Depth_Anything_V2_Base"]["facts"]["license_accepted"] is False
    assert listed["Depth_Anything_V2_Small"]["facts"]["license_accepted"] is True
    assert listed["MiDaS"]["license"] == "MIT"
    facts = listed["Depth_Anything_V2_Base"]["facts"]
    assert facts["family_label"] == "Depth Anything V2"
    assert facts["input_size"] == 518 == listed["Depth_Anything_V2_Base"]["input_size"]
    assert facts["preprocessing"]["resize_method"] == "lower_bound"
    assert facts["preprocessing"]["ensure_multiple_of"] == 14
    status = {row["name"]: row for row in staff.get("/api/models/status").json()["models"]}
    assert status["Depth_Anything_V2_Large"]["license_accepted"] is False

    # The upload page is public here: it names the licence, not the setting nor what it holds...
    form = client.get("/").content.decode()
    assert "refused here: this site does not accept its licence CC-BY-NC-4.0" in form
    assert SETTING not in form
    # ...which the operators who can change it read there.
    operator = get_user_model().objects.create_user("op", "op@example.com", "pw-op-12345", is_staff=True)
    grant_operator_permissions(operator)
    operator_client = Client()
    operator_client.force_login(operator)
    form = operator_client.get("/").content.decode()
    assert "refused here: its licence CC-BY-NC-4.0 is not in DEPTHSITE_ACCEPTED_LICENSES" in form
    dashboard = client.get("/models/").content.decode()
    assert "CC-BY-NC-4.0" in dashboard and "refused here" in dashboard and "Apache-2.0" in dashboard
    code, out, _ = run_cli("models", "list")
    line = next(line for line in out.splitlines() if "Depth_Anything_V2_Large" in line)
    assert "CC-BY-NC-4.0" in line and "licence refused" in line and SETTING in line


def test_predictions_say_the_licence(cached_small, settings):
    api = APIClient()
    api.force_authenticate(get_user_model().objects.create_user("v", "v@example.com", "pw-v-12345"))
    photo = SimpleUploadedFile("photo.jpg", images.jpeg(), content_type="image/jpeg")
    body = api.post("/api/predictions/", {"image": photo, "model": "MiDaS_small"}, format="multipart").json()
    assert body["model_license"] == "MIT"
    assert api.get(body["url"]).json()["model_license"] == "MIT"
