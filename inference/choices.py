"""Choices of depth jobs, with the groups that views, services and the recovery rely on."""
from django.db import models


from models_registry.choices import RunStatus

# A job lives like any background run: queued, running, then succeeded or failed (groups ACTIVE, TERMINAL).
JobStatus = RunStatus


class JobErrorCode(models.TextChoices):
    """Why a job failed, for API clients that branch on it; the message says what to do."""

    OFFLINE = "offline", "model not cached and the site is offline"
    DOWNLOAD = "download_failed", "weight download failed"
    WEIGHTS = "weights", "weights unusable"
    IMAGE = "image", "image unreadable"
    OUT_OF_MEMORY = "out_of_memory", "out of memory"
    TIMEOUT = "timeout", "took too long"
    INTERRUPTED = "interrupted", "worker stopped repeatedly"
    MODEL = "model", "model unavailable"
    INTERNAL = "internal", "internal error"
