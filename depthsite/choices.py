"""Choices shared by every app (the shared kernel)."""
from __future__ import annotations

from django.db import models


class RunStatus(models.TextChoices):
    """The life of a background run: a weight download, a management run."""

    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"


RunStatus.ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
RunStatus.TERMINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED)
