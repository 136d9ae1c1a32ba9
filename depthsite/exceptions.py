"""The domain errors of the whole site (the shared kernel): one small family that every door renders the same way.

Each error carries a message a user can act on and optional structured `extra`; the REST layer maps
`status` to the HTTP code, commands print the message on one line and exit with `exit_code`.
"""
from __future__ import annotations

from typing import Any


class ApplicationError(Exception):
    status = 400
    exit_code = 2

    def __init__(self, message: str, extra: dict[str, Any] | None = None, *, file: str = ""):
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        self.file = file  # the name by which the message names the file it is about, if any

    def __str__(self) -> str:
        return self.message

    def file_named(self, name: str) -> ApplicationError:
        """The same error naming its file as the caller knows it (an upload's own name, not its temporary one)."""
        if self.file and name and name != self.file:
            self.message = self.message.replace(self.file, name)
            self.file = name
        return self


class InvalidRequestError(ApplicationError):
    """The request itself is wrong (unknown format, bad size, missing confirmation). Not Django's
    ValidationError, which forms and model fields raise."""


class NotFoundError(ApplicationError):
    status = 404


class ConflictError(ApplicationError):
    """The operation collides with the cache's state (already running, would overwrite, pinned hash)."""

    status = 409


class TooLargeError(ApplicationError):
    status = 413


class LicenseError(ApplicationError):
    """The weights' licence is not one this deployment accepts (DEPTHSITE_ACCEPTED_LICENSES)."""

    status = 403


class WeightFileError(ApplicationError):
    """A weight file is unreadable, of the wrong kind, or does not hold the model's weights."""

    status = 422


class DigestMismatchError(ApplicationError):
    """Bytes differ from the pinned hash or from the record. Not the database's IntegrityError."""

    status = 409


class OfflineError(ApplicationError):
    status = 503


class DownloadError(ApplicationError):
    status = 502


class DiskFullError(ApplicationError):
    status = 507
