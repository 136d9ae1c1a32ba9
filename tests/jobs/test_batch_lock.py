"""A batch decodes, hashes and stores its photos before it takes the database's write lock (BEGIN IMMEDIATE on
SQLite): every other writer waits for as long as that transaction lasts, so it holds only the inserts."""
from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from depthsite.testing import images
from inference.models import DepthBatch, DepthJob
from inference.services import jobs
from tests.jobs.conftest import upload

# Real transactions: inside pytest-django's usual test transaction every statement is in an atomic block.
pytestmark = pytest.mark.django_db(transaction=True)
BATCH = "/api/predictions/batch"


def stored_uploads() -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / "uploads"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


@pytest.fixture
def anonymous(settings, monkeypatch) -> APIClient:
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    monkeypatch.setattr(jobs, "depth_job_enqueue", lambda job_id: None)  # queued only: no job runs here
    return APIClient()


class StorageSaves(list):
    """Every save into the uploads' storage, as (name, whether a transaction was open); `after` runs after each."""

    def after(self) -> None:
        pass


@pytest.fixture
def storage_saves(monkeypatch) -> StorageSaves:
    storage = DepthJob._meta.get_field("image").storage
    real_save = storage.save
    saves = StorageSaves()

    def save(name, content, *args, **kwargs):
        stored = real_save(name, content, *args, **kwargs)
        saves.append((stored, connection.in_atomic_block))
        saves.after()
        return stored

    monkeypatch.setattr(storage, "save", save)
    return saves


def post_batch(client, count: int):
    photos = [upload(images.jpeg(96 + n, 72), f"{n}.jpg") for n in range(count)]
    return client.post(BATCH, {"images": photos, "outputs": "png"}, format="multipart")


def test_photos_are_checked_and_stored_outside_the_transaction(anonymous, small_model, monkeypatch, storage_saves):
    real_check = jobs.image_check
    checked: list[bool] = []

    def image_check(*args, **kwargs):
        checked.append(connection.in_atomic_block)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(jobs, "image_check", image_check)
    response = post_batch(anonymous, 2)
    assert response.status_code == 202, response.content
    assert checked == [False, False]
    assert [in_transaction for _, in_transaction in storage_saves] == [False, False]
    # Nothing lost: every job of the batch points at its stored photo.
    batch = DepthBatch.objects.get()
    stored = sorted(job.image.name for job in DepthJob.objects.filter(batch=batch))
    assert stored == sorted(name for name, _ in storage_saves)
    assert len(stored_uploads()) == 2


def test_a_batch_refused_once_its_photos_are_stored_leaves_no_file(anonymous, small_model, settings,
                                                                   storage_saves):
    settings.DEPTHSITE_ANON_MAX_JOBS = 2

    def concurrent_upload():
        # Another upload from the same address commits after this batch's up-front check, taking a place.
        if len(storage_saves) == 2:
            DepthJob.objects.create(client_address="127.0.0.1", image="uploads/elsewhere.jpg", image_size=1,
                                    image_sha256="0" * 64, model=small_model, model_name=small_model.name,
                                    outputs=["png"], colormap="inferno")

    storage_saves.after = concurrent_upload
    response = post_batch(anonymous, 2)
    assert response.status_code == 429, response.content
    assert response.json()["extra"]["kind"] == "quota_jobs"
    assert len(storage_saves) == 2 and stored_uploads() == []
    assert not DepthBatch.objects.exists()
    assert list(DepthJob.objects.values_list("image", flat=True)) == ["uploads/elsewhere.jpg"]
