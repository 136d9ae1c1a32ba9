"""Every address takes a body of at most what it can use, refused from the declared length before a byte is read:
a photo's limit at the upload addresses, a batch's at the batch ones, the import limit at the weight import, and
a small default everywhere else. The form's CSRF token is in the body, so before this a 4 GB POST with a bad token
was read whole, answered 403, and never counted against the upload rate."""
from __future__ import annotations

import io

import pytest
from django.test import Client

from depthsite.testing import images
from inference.forms import FORM_DRAIN_FACTOR
from inference.models import DepthJob

GB = 1000**3
BOUNDARY = "depthsite-test-boundary"


class ClientStillSending(io.BytesIO):
    """wsgi.input of a client that may have declared more than it has sent yet: asked for more than it holds, it
    fails the test (a real one would go on sending gigabytes). `bytes_read` says how much the server took."""

    bytes_read = 0

    def _took(self, chunk: bytes, size) -> bytes:
        if not chunk and size != 0:
            raise AssertionError(f"the server read on past the {self.bytes_read} bytes sent so far")
        self.bytes_read += len(chunk)
        return chunk

    def read(self, size=-1):
        return self._took(super().read(size), size)

    def readline(self, size=-1):
        return self._took(super().readline(size), size)


def multipart(fields: dict[str, str], file_name: str = "photo.jpg", content: bytes = b"\xff\xd8") -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{file_name}"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def bad_token_form(size: int | None = None) -> bytes:
    """A small upload form with a wrong CSRF token; `size`: its photo padded to make the body that long."""
    fields = {"csrfmiddlewaretoken": "x" * 64, "model": "MiDaS_small"}
    body = multipart(fields)
    return body if size is None else multipart(fields, content=b"\xff\xd8" + b"\0" * (size - len(body)))


def post_declaring(client: Client, path: str, declared: int | None = None, body: bytes | None = None):
    """POST `body` (by default a small form with a wrong CSRF token) to `path`, declaring `declared` bytes
    (by default its own length)."""
    body = bad_token_form() if body is None else body
    declared = len(body) if declared is None else declared
    stream = ClientStillSending(body)
    response = client.generic("POST", path, body, content_type=f"multipart/form-data; boundary={BOUNDARY}",
                              **{"wsgi.input": stream, "CONTENT_LENGTH": str(declared)})
    return response, stream


def browser(user=None) -> Client:
    """A browser whose CSRF token is checked, as a real one's is, holding the CSRF cookie of a visit (any client
    gets one): the check then reads the body for the token, where a missing cookie would refuse it unread."""
    client = Client(enforce_csrf_checks=True)
    if user is not None:
        client.force_login(user)
    client.get("/accounts/login/")
    assert "csrftoken" in client.cookies
    return client


@pytest.fixture
def strict(reader) -> Client:
    return browser(reader)


@pytest.mark.django_db
def test_a_huge_body_with_a_bad_token_at_the_upload_form_is_refused_unread(strict, small_model):
    response, stream = post_declaring(strict, "/", 10 * GB)
    assert response.status_code == 413
    assert stream.bytes_read == 0
    assert response["Content-Type"].startswith("text/html")
    assert "The file is about 10.00 GB; the limit is 25.0 MB (DEPTHSITE_MAX_UPLOAD_BYTES)" in response.content.decode()
    assert not DepthJob.objects.exists()


@pytest.mark.django_db
def test_the_form_takes_a_photo_at_its_limit_plus_the_envelope(strict, small_model, settings):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 1000
    allowance = FORM_DRAIN_FACTOR * 1000 + 64 * 1024  # the form drains up to this to show itself again
    over, stream = post_declaring(strict, "/", allowance + 1)
    assert over.status_code == 413 and stream.bytes_read == 0
    # At the allowance the body is read, and the form's own checks answer (here the CSRF check, the token).
    within, stream = post_declaring(strict, "/", body=bad_token_form(allowance))
    assert within.status_code == 403 and stream.bytes_read == allowance


@pytest.mark.django_db
def test_a_normal_upload_still_makes_a_job(strict, small_model):
    token = strict.cookies["csrftoken"].value
    body = multipart({"csrfmiddlewaretoken": token, "model": "MiDaS_small", "colormap": "inferno", "outputs": "png"},
                     content=images.jpeg())
    response, _ = post_declaring(strict, "/", body=body)
    assert response.status_code == 302, response.content.decode()[-2000:]
    assert DepthJob.objects.count() == 1


@pytest.mark.django_db
def test_the_api_says_the_same_in_json(user_client):
    response, stream = post_declaring(user_client, "/api/predictions/", 10 * GB)
    assert response.status_code == 413 and stream.bytes_read == 0
    body = response.json()
    assert body["message"] == "image: the file is about 10.00 GB; the limit is 25.0 MB (DEPTHSITE_MAX_UPLOAD_BYTES)"
    assert body["extra"]["field"] == "image" and body["extra"]["limit"] == 25 * 1000**2


@pytest.mark.django_db
def test_a_batch_takes_the_batch_limit(strict, user_client, settings):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 1000**2
    settings.DEPTHSITE_BATCH_MAX_BYTES = 8 * 1000**2
    # The API refuses past the limit and its envelope; the batch page drains up to FORM_DRAIN_FACTOR times it.
    refused = ((strict, "/batch/", 33 * 1000**2), (user_client, "/api/predictions/batch", 9 * 1000**2))
    for client, path, length in refused:
        over, stream = post_declaring(client, path, length)
        assert over.status_code == 413 and stream.bytes_read == 0
        assert "a batch takes at most 8.0 MB in all (DEPTHSITE_BATCH_MAX_BYTES)" in over.content.decode()
    drained, stream = post_declaring(strict, "/batch/", body=bad_token_form(9 * 1000**2))
    assert drained.status_code == 403 and stream.bytes_read == 9 * 1000**2
    # Over a photo's limit and the default, within a batch's: the batch page reads it (and refuses the token).
    body = bad_token_form(6 * 1000**2)
    assert post_declaring(strict, "/", body=body)[0].status_code == 413
    within, stream = post_declaring(strict, "/batch/", body=body)
    assert within.status_code == 403 and stream.bytes_read == len(body)


@pytest.mark.django_db
def test_the_weight_import_keeps_its_larger_limit(anon_client, staff_client):
    # 100 MB is over every other address's limit: the import lets it through, and its own gate refuses the
    # anonymous caller before reading.
    response, stream = post_declaring(anon_client, "/api/models/import", 100 * 1000**2)
    assert response.status_code == 401 and stream.bytes_read == 0
    for path in ("/api/models/import", "/api/models/import/"):
        response, stream = post_declaring(staff_client, path, 5 * GB)
        assert response.status_code == 413 and stream.bytes_read == 0
        assert "exceeds the import limit of 4.00 GB" in response.json()["message"]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "json"), [
    ("/accounts/login/", False), ("/jobs/00000000-0000-0000-0000-000000000000/run-again", False),
    ("/api/models/cache/optimize", True), ("/no/such/page", False)])
def test_every_other_address_takes_a_small_body(strict, path, json):
    response, stream = post_declaring(strict, path, 6 * 1000**2)
    assert response.status_code == 413 and stream.bytes_read == 0
    said = "he request body is 6.0 MB, over the 5.1 MB this address takes (DATA_UPLOAD_MAX_MEMORY_SIZE)"
    assert said in (response.json()["message"] if json else response.content.decode())  # "The ..." on a page


@pytest.mark.django_db
def test_a_body_of_unknown_length_is_refused_unread(strict):
    stream = ClientStillSending(b"")
    response = strict.generic("POST", "/", b"", content_type=f"multipart/form-data; boundary={BOUNDARY}",
                              **{"wsgi.input": stream, "HTTP_TRANSFER_ENCODING": "chunked"})
    assert response.status_code == 411 and stream.bytes_read == 0
    assert "Content-Length" in response.content.decode()


@pytest.mark.django_db
def test_failed_csrf_checks_at_the_upload_form_count_against_the_rate(small_model, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"uploads": "2/hour", "writes": "2/hour"}}
    anonymous = browser()
    seen = []
    for _ in range(3):
        response, stream = post_declaring(anonymous, "/")
        seen.append((response.status_code, stream.bytes_read > 0))
    # Two bodies read and refused for their token; then the rate refuses before a byte is read.
    assert seen == [(403, True), (403, True), (429, False)]


@pytest.mark.parametrize(("declared", "status"), [(" 512 ", None), ("+512", None), ("-1", 400), ("12ab", 400)])
def test_the_declared_length_is_read_as_django_reads_it(rf, declared, status):
    from depthsite.middleware_limits import body_refusal

    request = rf.post("/no-such-address/", data=b"", content_type="application/octet-stream")
    request.META["CONTENT_LENGTH"] = declared
    refusal = body_refusal(request)
    assert (refusal.status if refusal is not None else None) == status
