"""Choices of depth jobs, with the groups that views, services and the recovery rely on."""
from django.db import models

# A job's status is depthsite.choices.RunStatus: queued, running, then succeeded or failed (ACTIVE, TERMINAL).


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
