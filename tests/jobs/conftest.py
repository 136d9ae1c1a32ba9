"""Fixtures of the job tests: users and clients, real photo uploads, and commits that run the queued job inline."""
from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from depthsite.testing import images


@pytest.fixture(autouse=True)
def _fresh_throttles():
    """Throttle counters live in the cache: each test starts with none."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _no_network(settings):
    """A job whose model is not cached must never try github.com from a test; tests that want a download
    point DEPTHSITE_MODEL_MIRROR at a file:// folder (allowed offline)."""
    settings.DEPTHSITE_OFFLINE = True


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user("alice", "alice@example.com", "pw-alice-123")


@pytest.fixture
def other_user(db):
    return get_user_model().objects.create_user("bob", "bob@example.com", "pw-bob-123")


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_superuser("admin", "admin@example.com", "pw-admin-123")


@pytest.fixture
def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def run_jobs(django_capture_on_commit_callbacks):
    """Commit callbacks (the enqueue) run as the block exits; with Q_CLUSTER sync the job runs right there."""
    def _context():
        return django_capture_on_commit_callbacks(execute=True)

    return _context


def upload(data: bytes | None = None, name: str = "photo.jpg", content_type: str = "image/jpeg") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, images.jpeg() if data is None else data, content_type=content_type)


@pytest.fixture
def photo() -> SimpleUploadedFile:
    return upload()
