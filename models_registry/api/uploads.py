"""Weight-file uploads streamed straight into the cache folder, refused as soon as they exceed the import limit."""
from __future__ import annotations

import re
from pathlib import Path

from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.http import QueryDict
from django.utils.datastructures import MultiValueDict

from depthsite.units import format_size
from models_registry import cachefs
from depthsite.exceptions import TooLargeError

IMPORTS_DIR = ".imports"
# Room for the multipart envelope (boundaries, part headers, the `model` field) around a file at the limit.
ENVELOPE_BYTES = 64 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _too_large(size: int, limit: int) -> TooLargeError:
    return TooLargeError(
        f"the upload ({format_size(size)}) exceeds the import limit of {format_size(limit)} "
        "(DEPTHSITE_MAX_IMPORT_BYTES); copy the file to the server and run `manage.py models import PATH`",
        extra={"max_bytes": limit, "size": size},
    )


class BodyGate(FileUploadHandler):
    """The first upload handler of a view that must authenticate, authorise and throttle before reading a byte.

    Until `open()`, a multipart parse (a session login's CSRF check reads `request.POST`) answers "no fields,
    no files" without touching the body, so a caller who will be refused never gets a byte read or written;
    such clients send the CSRF token in the X-CSRFToken header. The view opens the gate once DRF's
    `initial()` (authentication, permissions, throttles) has passed, and the real parse then reads the body.
    """

    def __init__(self, request=None):
        super().__init__(request)
        self.is_open = False
        self.django_request = request

    @classmethod
    def install(cls, request) -> "BodyGate":
        """Put a closed gate in front of the request's upload handlers (`request` is Django's HttpRequest)."""
        gate = cls(request)
        request.upload_handlers.insert(0, gate)
        return gate

    def open(self, request=None) -> None:
        """Let the body be parsed: forget the empty result a closed gate gave to anything that asked early
        (Django's `request.POST`, and DRF's parsed data when `request`, the DRF Request, is given)."""
        from rest_framework.request import Empty

        self.is_open = True
        for cached in ("_post", "_files"):
            if hasattr(self.django_request, cached):
                delattr(self.django_request, cached)
        if request is not None:
            request._data = request._files = request._full_data = Empty

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if self.is_open:
            return None
        return QueryDict(encoding=encoding), MultiValueDict()

    def receive_data_chunk(self, raw_data, start):
        return raw_data

    def file_complete(self, file_size):
        return None


class CachedUpload(UploadedFile):
    """An uploaded file already on disk inside the cache folder, under a temporary name."""

    def __init__(self, *, path: Path, name: str, size: int, content_type: str):
        super().__init__(open(path, "rb"), name=name, content_type=content_type, size=size)
        self.path = path

    def temporary_file_path(self) -> str:
        return str(self.path)


class ImportUploadHandler(FileUploadHandler):
    """Writes each uploaded file to `<cache>/.imports/.tmp-...` (same disk as the cache: no second copy of
    gigabytes in /tmp), refusing bodies whose Content-Length, or files whose bytes, pass `max_bytes`.

    The temporary names let `models optimize` remove leftovers of a crashed server; the view deletes them
    itself through `cleanup()` whatever happens.
    """

    def __init__(self, request=None, *, max_bytes: int | None):
        super().__init__(request)
        self.max_bytes = max_bytes
        self.paths: list[Path] = []
        self.file = None
        self.received = 0

    def unread_refusal(self, length: int) -> TooLargeError | None:
        """The 413 of a body of `length` bytes, known before any of it is read (also depthsite.middleware_limits)."""
        if self.max_bytes is not None and length > self.max_bytes + ENVELOPE_BYTES:
            return _too_large(length, self.max_bytes)
        return None

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        # Before a byte of the body is read: the client learns at once, and nothing is written.
        refusal = self.unread_refusal(content_length)
        if refusal is not None:
            raise refusal
        return None

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        folder = cachefs.cache_root() / IMPORTS_DIR
        folder.mkdir(exist_ok=True)
        safe = _UNSAFE.sub("_", Path(self.file_name or "upload").name)[-100:] or "upload"
        path = cachefs.temp_path_for(folder / safe)
        self.paths.append(path)
        self.file = open(path, "wb")
        self.received = 0

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.max_bytes is not None and self.received > self.max_bytes:
            self.file.close()
            raise _too_large(self.received, self.max_bytes)
        self.file.write(raw_data)
        return None

    def file_complete(self, file_size):
        self.file.close()
        return CachedUpload(path=self.paths[-1], name=self.file_name, size=file_size,
                            content_type=self.content_type or "application/octet-stream")

    def upload_interrupted(self):
        self.cleanup()

    def cleanup(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
        for path in self.paths:
            path.unlink(missing_ok=True)
