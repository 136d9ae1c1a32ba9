"""POST /api/models/import reads no byte of its body until the caller is authenticated, staff and within the rate."""
from __future__ import annotations

import io

import pytest
from django.conf import settings
from django.test import Client

from models_registry.api.uploads import ImportUploadHandler
from tests.api.conftest import cache_leftovers

IMPORT = "/api/models/import"
BOUNDARY = "depthsite-test-boundary"
BIG = 8 * 1000**2


class CountingStream(io.BytesIO):
    """wsgi.input that counts the bytes the server reads from it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size=-1):
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk

    def readline(self, size=-1):
        line = super().readline(size)
        self.bytes_read += len(line)
        return line


def multipart(content: bytes, name: str = "weights.pt") -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(client: Client, body: bytes, **headers):
    stream = CountingStream(body)
    response = client.generic("POST", IMPORT, body, content_type=f"multipart/form-data; boundary={BOUNDARY}",
                              **{"wsgi.input": stream, **headers})
    return response, stream


@pytest.fixture
def opened_files(monkeypatch):
    """Every file the import handler starts writing."""
    started = []
    original = ImportUploadHandler.new_file

    def spy(self, *args, **kwargs):
        started.append(kwargs.get("file_name") or args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImportUploadHandler, "new_file", spy)
    return started


@pytest.fixture
def upload_temp(settings, tmp_path):
    folder = tmp_path / "upload-temp"
    folder.mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    return folder


def session(user) -> tuple[Client, str]:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    token = client.get("/models/").cookies["csrftoken"].value
    return client, token


def assert_nothing_read_or_written(stream, opened_files, upload_temp):
    assert stream.bytes_read == 0, f"{stream.bytes_read} bytes of the body were read before the refusal"
    assert opened_files == []
    assert list(upload_temp.iterdir()) == []
    root = settings.DEPTHSITE_CACHE_DIR
    assert not root.exists() or cache_leftovers(root) == []


@pytest.mark.django_db
@pytest.mark.parametrize("with_token", [True, False])
def test_a_signed_in_non_staff_session_is_refused_before_the_body_is_read(reader, opened_files, upload_temp,
                                                                          with_token):
    client, token = session(reader)
    headers = {"HTTP_X_CSRFTOKEN": token} if with_token else {}
    response, stream = post(client, multipart(b"\0" * BIG), **headers)
    assert response.status_code == 403
    assert "message" in response.json()
    assert_nothing_read_or_written(stream, opened_files, upload_temp)
    print(f"\nnon-staff session ({'with' if with_token else 'without'} CSRF token): {stream.bytes_read} of "
          f"{len(stream.getvalue())} body bytes read")


@pytest.mark.django_db
def test_an_anonymous_caller_is_refused_before_the_body_is_read(opened_files, upload_temp):
    response, stream = post(Client(), multipart(b"\0" * BIG))
    assert response.status_code == 401
    assert_nothing_read_or_written(stream, opened_files, upload_temp)


@pytest.mark.django_db
def test_staff_over_the_rate_is_refused_before_the_body_is_read(operator, opened_files, upload_temp, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"uploads": "1/hour", "writes": "100/hour"}}
    client, token = session(operator)
    first, first_stream = post(client, multipart(b"not weights at all"), HTTP_X_CSRFTOKEN=token)
    # The gate opens for an allowed caller: the body is read and the service judges the file.
    assert first.status_code == 422, first.content
    assert first_stream.bytes_read == len(first_stream.getvalue()) and opened_files == ["weights.pt"]
    opened_files.clear()
    second, stream = post(client, multipart(b"\0" * BIG), HTTP_X_CSRFTOKEN=token)
    assert second.status_code == 429
    assert_nothing_read_or_written(stream, opened_files, upload_temp)


@pytest.mark.django_db
def test_a_staff_session_must_send_the_csrf_token_in_the_header(operator, opened_files, upload_temp):
    client, token = session(operator)
    body = multipart(b"\0" * 1000).replace(
        f"--{BOUNDARY}\r\n".encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n{token}\r\n'
        f"--{BOUNDARY}\r\n".encode(), 1)
    response, stream = post(client, body)
    assert response.status_code == 403 and "CSRF" in response.json()["message"]
    assert_nothing_read_or_written(stream, opened_files, upload_temp)
