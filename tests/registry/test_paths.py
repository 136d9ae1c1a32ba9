"""Names never become paths outside the cache: the admin refuses them, and rows forced into the database
with such names or paths cannot make clear, optimize or download read, write or delete anything elsewhere."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from django.urls import reverse

from models_registry import cachefs
from models_registry.choices import Health
from depthsite.exceptions import ApplicationError, InvalidRequestError
from models_registry.models import RegisteredModel, WeightDownload, WeightFile
from models_registry.services.cache import cache_clear, cache_optimize_execute, cache_optimize_plan
from models_registry.services.download import weight_download
from models_registry.services.transfer import download_url

pytestmark = pytest.mark.django_db

BAD_NAMES = ["/tmp/x", "../x", "..", ".", "a/../../b", "a\\b", ".locks", ".tmp-x", "x\x00y", ""]
BAD_FILE_NAMES = ["/etc/passwd", "../../secret.pt", "a/b.pt", "..", ".hidden.pt", "x.pt.part"]


@pytest.fixture
def staff_client(client):
    user = get_user_model().objects.create_superuser("admin", "admin@example.com", "pw-admin-123")
    client.force_login(user)
    return client


def _admin_add(client, **fields):
    data = {
        "name": "Custom_small", "display_name": "Custom", "architecture": "MiDaS_small", "aliases": "[]",
        "description": "", "source_url": "https://example.com/w/custom.pt", "file_name": "custom.pt",
        "expected_size": "", "expected_sha256": "", "expected_content_digest": "", "license": "MIT",
        "semantics": "", "input_size": "256", "preprocessing": "{}", "enabled": "on",
        "weight_files-TOTAL_FORMS": "0", "weight_files-INITIAL_FORMS": "0",
        "weight_files-MIN_NUM_FORMS": "0", "weight_files-MAX_NUM_FORMS": "1000",
        **fields,
    }
    return client.post(reverse("admin:models_registry_registeredmodel_add"), data)


def _outside(tmp_path: Path) -> Path:
    """A folder beside the cache (the cache is tmp_path/depthsite/cache) holding a file nobody may touch."""
    folder = tmp_path / "outside"
    folder.mkdir(exist_ok=True)
    (folder / "victim.pt.part").write_bytes(b"not yours")
    (folder / "victim.pt").write_bytes(b"not yours either")
    return folder


def _untouched(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- where names are made -----------------------------------------------------------------------


def test_admin_accepts_a_plain_name_and_refuses_paths(staff_client):
    ok = _admin_add(staff_client)
    assert ok.status_code == 302, ok.content[:2000]
    assert RegisteredModel.objects.filter(name="Custom_small").exists()

    for index, bad in enumerate(BAD_NAMES):
        response = _admin_add(staff_client, name=bad, display_name=f"bad {index}")
        assert response.status_code == 200, bad  # the form again, with its error
        assert response.context["adminform"].form.errors.get("name"), bad
    for index, bad in enumerate(BAD_FILE_NAMES):
        response = _admin_add(staff_client, name=f"Bad_{index}", file_name=bad)
        assert response.status_code == 200, bad
        errors = response.context["adminform"].form.errors.get("file_name")
        assert errors, bad
    assert list(RegisteredModel.objects.filter(display_name__startswith="bad")) == []
    assert not RegisteredModel.objects.filter(name__startswith="Bad_").exists()


def test_renaming_in_the_admin_to_a_path_is_refused(staff_client, small_model):
    url = reverse("admin:models_registry_registeredmodel_change", args=[small_model.pk])
    page = staff_client.get(url)
    form = page.context["adminform"].form
    data = {name: ("" if value is None else value) for name, value in form.initial.items()
            if name not in ("is_official", "created_at", "updated_at", "sha256_pinned_at", "sha256_pinned_from")}
    data.update({"aliases": '["midas_small"]', "preprocessing": "{}", "enabled": "on", "name": "../../elsewhere",
                 "weight_files-TOTAL_FORMS": "0", "weight_files-INITIAL_FORMS": "0",
                 "weight_files-MIN_NUM_FORMS": "0", "weight_files-MAX_NUM_FORMS": "1000"})
    response = staff_client.post(url, data)
    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors
    small_model.refresh_from_db()
    assert small_model.name == "MiDaS_small"


def test_model_full_clean_refuses_path_names(small_model):
    small_model.file_name = "../../etc/passwd"
    with pytest.raises(DjangoValidationError) as caught:
        small_model.full_clean()
    assert "file_name" in caught.value.message_dict


# --- the one join that refuses to leave its root ------------------------------------------------


def test_contained_refuses_whatever_resolves_outside(tmp_path):
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    assert cachefs.contained(root, "inner", "x.pt") == root / "inner" / "x.pt"
    os.symlink(tmp_path, root / "link")
    for parts in (["/etc/passwd"], ["../x"], ["inner/../../x"], ["link", "x"], [""], ["."], ["inner", ".."]):
        with pytest.raises(InvalidRequestError) as caught:
            cachefs.contained(root, *parts)
        assert caught.value.extra["kind"] == "unsafe_path"


# --- rows forced into the database --------------------------------------------------------------


def _force_name(model: RegisteredModel, **fields) -> RegisteredModel:
    RegisteredModel.objects.filter(pk=model.pk).update(**fields)  # no validators: as a raw SQL write would
    model.refresh_from_db()
    return model


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_clear_with_a_forced_bad_name_touches_nothing_outside(small_model, tmp_path, kind):
    if kind == "relative":
        _clear_touches_nothing_outside(small_model, tmp_path, kind)
        return
    # A short absolute folder: the name column holds 64 characters (PostgreSQL enforces it).
    short = Path(tempfile.mkdtemp(prefix="ds-", dir="/tmp"))
    try:
        _clear_touches_nothing_outside(small_model, short, kind)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _clear_touches_nothing_outside(small_model, tmp_path, kind):
    outside = _outside(tmp_path)
    name = "../../outside" if kind == "relative" else str(outside)
    assert len(name) <= 64
    model = _force_name(small_model, name=name)
    assert (cachefs.cache_root() / name).resolve() == outside.resolve()  # what the old join would reach

    with pytest.raises(InvalidRequestError) as caught:
        cache_clear(model=model)
    assert "model name" in caught.value.message
    with pytest.raises(InvalidRequestError):
        cache_clear()  # every model: the bad one stops it before anything goes
    assert _untouched(outside) == ["victim.pt", "victim.pt.part"]
    assert not (tmp_path / "outside.lock").exists() and not list(tmp_path.glob("*.lock"))


def test_optimize_never_deletes_a_record_path_outside_the_cache(small_model, cached_small, tmp_path):
    outside = _outside(tmp_path)
    WeightFile.objects.filter(pk=cached_small.pk).update(path="../../outside/victim.pt", health=Health.CORRUPT)
    WeightFile.objects.create(model=small_model, format="h5", path=str(outside / "victim.pt.part"), size=9,
                              sha256="0" * 64, health=Health.CORRUPT, node="test-node")

    plan = cache_optimize_plan(max_bytes=0)
    assert all(not item.path.startswith(("..", "/")) for item in plan.items)
    assert len([e for e in plan.errors if "outside" in e]) == 2
    cache_optimize_execute(plan=plan)
    assert _untouched(outside) == ["victim.pt", "victim.pt.part"]
    assert WeightFile.objects.filter(model=small_model).count() == 2  # reported, not silently dropped


def test_download_with_a_forced_bad_name_writes_nothing_outside(small_model, tmp_path, settings):
    outside = _outside(tmp_path)
    settings.DEPTHSITE_MODEL_MIRROR = "http://127.0.0.1:9/"  # never reached
    model = _force_name(small_model, name="../../outside")
    with pytest.raises(InvalidRequestError):
        weight_download(model=model)
    assert _untouched(outside) == ["victim.pt", "victim.pt.part"]
    assert not list(tmp_path.glob("outside*.lock"))

    model = _force_name(small_model, name="MiDaS_small", file_name="../../outside/victim.pt")
    with pytest.raises(InvalidRequestError):
        weight_download(model=model)
    assert _untouched(outside) == ["victim.pt", "victim.pt.part"]
    assert not WeightFile.objects.exists()


def test_file_mirror_never_copies_a_file_outside_its_folder(small_model, small_pt, tmp_path, settings):
    """The secret is valid weights, so the old join would have cached it (and served it) as the model's."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    secret = tmp_path / "secret.pt"
    small_pt.rename(secret)
    settings.DEPTHSITE_MODEL_MIRROR = mirror.as_uri()
    model = _force_name(small_model, file_name="../secret.pt")

    with pytest.raises(InvalidRequestError) as caught:
        weight_download(model=model)
    assert "file name" in caught.value.message
    assert not WeightFile.objects.exists()
    assert [p for p in cachefs.cache_root().rglob("*") if p.is_file() and ".locks" not in p.parts] == []

    # The same file in the mirror's own folder is fine: the check refuses paths, not downloads.
    model = _force_name(small_model, file_name="secret.pt")
    secret.rename(mirror / "secret.pt")
    result = weight_download(model=model)
    assert result.transferred
    assert result.weight_file.sha256 == hashlib.sha256((mirror / "secret.pt").read_bytes()).hexdigest()


def test_only_the_operator_mirror_may_be_a_local_folder(small_model, settings, tmp_path):
    settings.DEPTHSITE_MODEL_MIRROR = ""
    model = _force_name(small_model, source_url=(tmp_path / "x.pt").as_uri())
    with pytest.raises(ApplicationError) as caught:
        download_url(model=model)
    assert "http(s)" in caught.value.message
    assert not WeightDownload.objects.exists()


def test_a_result_path_forced_outside_media_is_not_served(db, settings, tmp_path):
    from depthsite.choices import RunStatus
    from inference.models import DepthJob
    from inference.selectors import depth_job_file
    from depthsite.exceptions import NotFoundError

    secret = tmp_path / "secret_key"
    secret.write_text("server secret")
    media = Path(settings.MEDIA_ROOT)
    (media / "results").mkdir(parents=True)
    job = DepthJob.objects.create(image="uploads/x.jpg", image_sha256="0" * 64, image_size=1, model_name="MiDaS_small",
                                  outputs=["png", "npy"], colormap="inferno", status=RunStatus.SUCCEEDED,
                                  result_files={"png": os.path.relpath(secret, media), "npy": str(secret)})
    for fmt in ("png", "npy"):
        with pytest.raises(NotFoundError):
            depth_job_file(job=job, fmt=fmt)
    own = media / "results" / str(job.pk) / "x.png"
    own.parent.mkdir()
    own.write_bytes(b"png")
    DepthJob.objects.filter(pk=job.pk).update(result_files={"png": f"results/{job.pk}/x.png"})
    job.refresh_from_db()
    assert depth_job_file(job=job, fmt="png").name == f"results/{job.pk}/x.png"
    # Another job's result folder is outside this one's: not served either.
    DepthJob.objects.filter(pk=job.pk).update(result_files={"png": "results/someone-else/x.png"})
    job.refresh_from_db()
    with pytest.raises(NotFoundError):
        depth_job_file(job=job, fmt="png")


def test_a_record_forced_outside_is_never_loaded_and_a_download_replaces_it(small_model, small_pt, tmp_path,
                                                                            settings):
    from models_registry.services.resolve import weights_resolve

    outside = tmp_path / "outside.pt"
    small_pt.rename(outside)  # valid weights: reading them would "work", which is the danger
    row = WeightFile.objects.create(model=small_model, format="pt", path=str(outside), size=outside.stat().st_size,
                                    sha256="0" * 64, health=Health.OK, node="test-node")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    os.link(outside, mirror / small_model.file_name)
    settings.DEPTHSITE_MODEL_MIRROR = mirror.as_uri()

    weight_file = weights_resolve(model=small_model)

    assert weight_file.pk == row.pk  # the same row, now describing a file inside the cache
    assert weight_file.path == f"MiDaS_small/{small_model.file_name}"
    assert cachefs.absolute(weight_file.path).is_file() and outside.is_file()
