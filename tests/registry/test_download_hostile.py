"""Downloads against servers and settings that try to leak or wear down the site, on loopback: a mirror's
password never reaches a stored field, an error or an API answer; redirects to other schemes, to plain http or
from a public host to an internal one are refused before that host is contacted; a file's first bytes never
land on a download row; a server that drops every connection costs linear hashing and a bounded number of
resumes."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import ipaddress
import json
import os
import ssl
import threading
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from depthsite.choices import RunStatus
from depthsite.exceptions import ApplicationError, DownloadError
from depthsite.testing.weightserver import POLL_INTERVAL, WeightServer
from models_registry import cachefs, fetch
from models_registry.models import WeightDownload, WeightFile
from models_registry.services.download import weight_download

FILE_NAME = "midas_v21_small_256.pt"
PASSWORD = "s3cr3t-mirror-pw"
KB = 1024


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_BACKOFF_SECONDS", 0.01)
    # A redirect that is wrongly followed to an address where nothing answers fails fast instead of in 15 s.
    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT_SECONDS", 0.5)


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_arrays):
    from models_registry.formats import write_weights

    root = tmp_path_factory.mktemp("served-hostile")
    write_weights(small_arrays, root / FILE_NAME, "pt", {})
    return {"root": root, "sha256": hashlib.sha256((root / FILE_NAME).read_bytes()).hexdigest()}


@pytest.fixture
def reader(client):
    """A signed-in account that is not staff: it reads the registry API with the full (unredacted) view."""
    client.force_login(get_user_model().objects.create_user("reader", "reader@example.com", "pw-reader-123"))
    return client


def _read_api(client, download: WeightDownload | None) -> list[bytes]:
    paths = ["/api/models/", "/api/models/MiDaS_small/", "/api/models/status"]
    if download is not None:
        paths.append(f"/api/models/downloads/{download.pk}")
    answers = []
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, (path, response.content[:300])
        answers.append(response.content)
    return answers


# --- a mirror URL with a password ----------------------------------------------------------------------


class _Gatekeeper(WeightServer):
    """A WeightServer that answers 401 to any GET without the mirror's Basic credentials."""

    def __init__(self, root: Path, user: str, password: str):
        super().__init__(root)
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        base = self.httpd.RequestHandlerClass

        class Handler(base):
            def do_GET(self):
                if self.headers.get("Authorization") != expected:
                    return self._simple(401, b"credentials needed\n")
                return super().do_GET()

        self.httpd.RequestHandlerClass = Handler


@pytest.fixture
def gated(served, settings):
    with _Gatekeeper(served["root"], "mirror", PASSWORD) as server:
        settings.DEPTHSITE_MODEL_MIRROR = server.url.replace("http://", f"http://mirror:{PASSWORD}@") + "/"
        yield server


def _no_password(*texts) -> None:
    for text in texts:
        text = text if isinstance(text, str) else text.decode() if isinstance(text, bytes) else json.dumps(text)
        assert PASSWORD not in text


def test_a_credentialed_mirror_is_used_but_its_password_is_never_stored_or_shown(small_model, gated, reader):
    result = weight_download(model=small_model)

    assert result.transferred and [r.status for r in gated.gets()] == [200]  # the credentials were sent
    shown = f"{gated.url}/{FILE_NAME}"
    assert result.source_url == shown
    small_model.refresh_from_db()
    assert small_model.sha256_pinned_from == shown
    row = WeightDownload.objects.get(model=small_model)
    assert row.source_url == shown
    _no_password(json.dumps(result.as_dict()), result.weight_file.origin_source, *_read_api(reader, row))


def _hostile_settings(kind: str, server: WeightServer, small_model) -> None:
    if kind == "html":
        server.configure(html=True)
    elif kind == "encoded":
        server.configure(gzip=True)
    elif kind == "too_large":
        server.configure(endless=True, declared_length=50 * 1000**3)
    elif kind == "missing":
        server.configure(status=404, status_times=-1)
    elif kind == "size_mismatch":
        small_model.expected_size = 12345
        small_model.save()
    elif kind == "pin_differs":
        small_model.expected_sha256 = "ab" * 32
        small_model.sha256_pinned_from = "operator"
        small_model.save()


@pytest.mark.parametrize("kind", ["html", "encoded", "too_large", "missing", "size_mismatch", "pin_differs",
                                  "unusable"])
def test_no_error_of_a_credentialed_mirror_quotes_its_password(small_model, settings, tmp_path, reader, kind):
    # A few bytes that pass the transfer and fail acceptance (a safetensors header without data): "unusable"
    # as they are, and small enough that every other failure is quick.
    header = json.dumps({"pretrained.layer1.0.weight": {"dtype": "F32", "shape": [1]}}).encode()
    (tmp_path / FILE_NAME).write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with _Gatekeeper(tmp_path, "mirror", PASSWORD) as server:
        settings.DEPTHSITE_MODEL_MIRROR = server.url.replace("http://", f"http://mirror:{PASSWORD}@")
        _hostile_settings(kind, server, small_model)
        with pytest.raises(ApplicationError) as caught:
            weight_download(model=small_model)

    assert server.url.removeprefix("http://") in caught.value.message  # the host is named, ...
    _no_password(caught.value.message, caught.value.extra)  # ... its password is not
    row = WeightDownload.objects.get(model=small_model)
    assert row.status == RunStatus.FAILED and row.error
    _no_password(row.error, row.source_url, *_read_api(reader, row))


def test_a_refused_mirror_setting_is_recorded_without_its_password(small_model, settings, reader):
    settings.DEPTHSITE_MODEL_MIRROR = f"ftp://mirror:{PASSWORD}@files.example.org/weights"
    row = WeightDownload.objects.create(model=small_model, node=cachefs.node_name())

    with pytest.raises(ApplicationError) as caught:
        weight_download(model=small_model, download=row)

    assert "DEPTHSITE_MODEL_MIRROR" in caught.value.message and "files.example.org" in caught.value.message
    row.refresh_from_db()
    assert row.status == RunStatus.FAILED
    _no_password(caught.value.message, row.error, *_read_api(reader, row))


# --- redirects ------------------------------------------------------------------------------------------


class _Redirector:
    """A loopback server answering every GET with `status` and `Location: location`, optionally over TLS;
    `hits` counts the GETs it saw."""

    def __init__(self, location: str = "", status: int = 302, tls: ssl.SSLContext | None = None):
        self.location, self.status, self.hits = location, status, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits += 1
                self.send_response(outer.status)
                self.send_header("Location", outer.location or self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "_Redirector":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def loopback_is_public(monkeypatch):
    """127.0.0.1 plays a public server, by name and by the address that answered; every other host (localhost
    included) is classified for real."""
    real_host, real_address = fetch.host_is_public, fetch.address_is_public
    monkeypatch.setattr(fetch, "host_is_public", lambda host: host == "127.0.0.1" or real_host(host))
    monkeypatch.setattr(fetch, "address_is_public", lambda address: address == "127.0.0.1" or real_address(address))


@pytest.fixture
def internal(tmp_path):
    """An 'internal service' on loopback whose answer must never reach a download."""
    (tmp_path / "internal").mkdir()
    (tmp_path / "internal" / "meta-data").write_bytes(b"INTERNAL-TOKEN-0123456789abcdef" * 4)
    with WeightServer(tmp_path / "internal") as server:
        yield server


def _download_refused(small_model, settings, origin: str) -> DownloadError:
    settings.DEPTHSITE_MODEL_MIRROR = origin
    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)
    assert not WeightFile.objects.exists()
    row = WeightDownload.objects.get(model=small_model)
    assert row.status == RunStatus.FAILED and row.error_code == caught.value.extra["code"]
    return caught.value


@pytest.mark.parametrize("target", ["http://localhost:{port}/meta-data", "http://[::ffff:127.0.0.1]:{port}/meta-data",
                                    "http://169.254.169.254/latest/meta-data/", "http://10.255.255.1/"])
def test_a_public_server_cannot_redirect_to_an_internal_address(small_model, settings, loopback_is_public,
                                                                internal, target):
    port = internal.httpd.server_address[1]
    with _Redirector(target.format(port=port)) as origin:
        error = _download_refused(small_model, settings, origin.url)

    assert error.extra["code"] == "download_redirect_internal" and error.extra["status"] == 302
    assert "not a public address" in error.message and origin.hits == 1
    assert internal.requests == []  # never contacted


def test_a_redirect_to_another_scheme_is_refused(small_model, settings, internal):
    with _Redirector(f"file://{internal.root}/meta-data") as origin:
        error = _download_refused(small_model, settings, origin.url)
    assert error.extra["code"] == "download_redirect_scheme" and "only http and https" in error.message


def test_endless_redirects_stop_at_the_limit(small_model, settings):
    with _Redirector() as origin:  # to itself, forever
        error = _download_refused(small_model, settings, origin.url)
    assert error.extra["code"] == "download_redirect_loop"
    assert origin.hits == fetch.MAX_REDIRECTS + 1


@pytest.fixture
def tls_context(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A server context with a fresh certificate for 127.0.0.1, which requests is told to trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def test_an_https_server_cannot_redirect_to_plain_http(small_model, settings, served, tls_context):
    with WeightServer(served["root"]) as plain, _Redirector(f"{plain.url}/{FILE_NAME}", tls=tls_context) as origin:
        error = _download_refused(small_model, settings, origin.url)
        assert plain.requests == []
    assert error.extra["code"] == "download_redirect_downgrade" and origin.hits == 1


def test_a_name_that_turns_internal_after_its_check_is_not_read(small_model, settings, served, monkeypatch):
    # DNS rebinding: the redirect's host resolved to a public address when checked, then to loopback at connect.
    # Here every name passes its check, the first answer (the origin's) comes from a "public" address, and the
    # next from loopback, as it would once the name was pointed there.
    answers = []
    monkeypatch.setattr(fetch, "host_is_public", lambda host: True)
    monkeypatch.setattr(fetch, "address_is_public", lambda address: answers.append(address) or len(answers) == 1)
    with WeightServer(served["root"]) as store, _Redirector(f"{store.url}/{FILE_NAME}", status=307) as origin:
        error = _download_refused(small_model, settings, origin.url)
    assert error.extra["code"] == "download_redirect_internal" and "when it was contacted" in error.message


def test_redirects_between_allowed_hosts_are_followed(small_model, settings, served, monkeypatch):
    monkeypatch.setattr(fetch, "host_is_public", lambda host: True)
    monkeypatch.setattr(fetch, "address_is_public", lambda address: True)
    with WeightServer(served["root"]) as store, _Redirector(f"{store.url}/{FILE_NAME}", status=307) as origin:
        settings.DEPTHSITE_MODEL_MIRROR = origin.url
        result = weight_download(model=small_model)
    assert result.weight_file.sha256 == served["sha256"] and origin.hits == 1
    assert result.source_url == f"{origin.url}/{FILE_NAME}"  # what the operator configured


@pytest.mark.parametrize(("address", "public"), [
    ("127.0.0.1", False), ("169.254.169.254", False), ("10.1.2.3", False), ("192.168.0.1", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False), ("fd00::1", False), ("fe80::1", False),
    ("::ffff:127.0.0.1", False), ("64:ff9b::a9fe:a9fe", False), ("2002:7f00:1::", False), ("224.0.0.1", False),
    ("localhost", False), ("name.invalid", False), ("8.8.8.8", True), ("2606:4700:4700::1111", True),
])
def test_host_classification(address, public):
    assert fetch.host_is_public(address) is public


# --- a file's first bytes -------------------------------------------------------------------------------


def test_a_download_row_never_quotes_the_first_bytes_of_what_was_fetched(small_model, settings, tmp_path, reader):
    secret = b"INTERNAL-TOKEN-0123456789abcdef" * 4
    (tmp_path / FILE_NAME).write_bytes(secret)
    with WeightServer(tmp_path) as server:
        settings.DEPTHSITE_MODEL_MIRROR = server.url
        with pytest.raises(ApplicationError):
            weight_download(model=small_model)

    row = WeightDownload.objects.get(model=small_model)
    assert row.status == RunStatus.FAILED and "not a weight file" in row.error
    preview = secret[:16].hex(" ")
    assert preview[:11] not in row.error and "first bytes" not in row.error
    for answer in _read_api(reader, row):
        assert preview[:11].encode() not in answer


# --- a server that keeps dropping the connection --------------------------------------------------------


class _CountingSha256:
    """hashlib.sha256 that adds up the bytes it is fed."""

    fed = 0

    def __init__(self):
        self._digest = hashlib.sha256()

    def update(self, data) -> None:
        _CountingSha256.fed += len(data)
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@pytest.fixture
def hashed(monkeypatch):
    class _Hashlib:
        sha256 = _CountingSha256

    _CountingSha256.fed = 0
    monkeypatch.setattr(fetch, "hashlib", _Hashlib)
    return _CountingSha256


@pytest.fixture
def blob(tmp_path) -> Path:
    (tmp_path / "blob").mkdir()
    path = tmp_path / "blob" / FILE_NAME
    path.write_bytes(os.urandom(2 * 1024 * KB))
    return path


def test_resumes_hash_each_byte_once(blob, tmp_path, hashed):
    with WeightServer(blob.parent) as server:
        server.configure(drop_after=256 * KB, drop_times=5)
        fetched = fetch.fetch(server.url_for(FILE_NAME), tmp_path / "out.part",
                              limits=fetch.Limits(max_bytes=10 * 1024 * KB))
        assert len(server.gets()) == 6
    assert fetched.sha256 == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert hashed.fed == blob.stat().st_size  # not the partial file again on every resume


def test_a_server_that_drops_every_connection_is_given_up_on(blob, tmp_path, hashed):
    part = tmp_path / "out.part"
    with WeightServer(blob.parent) as server:
        server.configure(drop_after=16 * KB, drop_times=-1)
        with pytest.raises(fetch.FetchError) as caught:
            fetch.fetch(server.url_for(FILE_NAME), part, limits=fetch.Limits(max_bytes=10 * 1024 * KB))
        connections = len(server.gets())
        received = server.bytes_sent

    assert caught.value.code == "download_interrupted" and f"{fetch.RESUME_ATTEMPTS + 1} times" in caught.value.what
    assert connections == fetch.RESUME_ATTEMPTS + 1 < blob.stat().st_size // (16 * KB)
    assert caught.value.partial == fetch.partial_size(part) == received  # kept for the next download
    assert hashed.fed == received


def test_the_download_row_says_why_and_keeps_the_bytes(small_model, settings, blob):
    with WeightServer(blob.parent) as server:
        server.configure(drop_after=16 * KB, drop_times=-1)
        settings.DEPTHSITE_MODEL_MIRROR = server.url
        with pytest.raises(DownloadError) as caught:
            weight_download(model=small_model)

    assert caught.value.extra["code"] == "download_interrupted" and caught.value.extra["resumable"]
    row = WeightDownload.objects.get(model=small_model)
    assert row.status == RunStatus.FAILED and row.error_code == "download_interrupted"
    assert "the next download resumes from there" in row.error



def test_a_partial_download_keeps_no_password_beside_it_and_still_resumes(blob, tmp_path):
    # The sidecar beside a .part lives in the cache folder: it names its source by a hash of the whole URL.
    part = tmp_path / "out.part"
    seen = []

    def progress(done, total):
        if fetch.sidecar_path(part).exists():
            seen.append(fetch.sidecar_path(part).read_text())

    with WeightServer(blob.parent) as server:
        url = server.url_for(FILE_NAME).replace("http://", f"http://depthsite:{PASSWORD}@")
        server.configure(drop_after=256 * KB, drop_times=1)
        fetched = fetch.fetch(url, part, limits=fetch.Limits(max_bytes=10 * 1024 * KB), on_progress=progress)
        gets = server.gets()
    assert fetched.sha256 == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert len(gets) == 2 and fetched.resumed_from > 0  # the second connection resumed, the source recognised
    assert seen and all(PASSWORD not in text for text in seen)
    assert json.loads(seen[0])["url"] == fetch.shown_url(url)


def test_a_sidecar_of_the_release_before_still_resumes_and_loses_its_password(blob, tmp_path):
    # The release before recorded the whole URL, password included: it must still resume, and be rewritten.
    import requests

    part = tmp_path / "out.part"
    data = blob.read_bytes()
    with WeightServer(blob.parent) as server:
        plain = server.url_for(FILE_NAME)
        url = plain.replace("http://", f"http://depthsite:{PASSWORD}@")
        head = requests.head(plain, timeout=5).headers
        part.write_bytes(data[:300 * KB])
        fetch.sidecar_path(part).write_text(json.dumps({"url": url, "etag": head["ETag"],
                                                        "last_modified": head["Last-Modified"], "total": len(data)}))
        seen = []
        fetched = fetch.fetch(url, part, limits=fetch.Limits(max_bytes=10 * 1024 * KB),
                              on_progress=lambda done, total: seen.append(fetch.sidecar_path(part).read_text()))
    assert fetched.resumed_from == 300 * KB and fetched.sha256 == hashlib.sha256(data).hexdigest()
    assert seen and all(PASSWORD not in text for text in seen)


def test_a_hop_is_public_by_the_address_that_answered_not_by_its_name_looked_up_again(small_model, settings,
                                                                                       monkeypatch, internal):
    # The redirecting host answered from a public address (127.0.0.1 plays one here), then its owner pointed its
    # name at an internal address: the name looked up again said "not public", and the redirect was let through.
    monkeypatch.setattr(fetch, "address_is_public", lambda address: address == "127.0.0.1")
    port = internal.httpd.server_address[1]
    with _Redirector(f"http://localhost:{port}/meta-data") as origin:
        error = _download_refused(small_model, settings, origin.url)
    assert error.extra["code"] == "download_redirect_internal" and origin.hits == 1
    assert internal.requests == []


def _partial_for(part: Path, url: str, data: bytes, length: int, **meta) -> None:
    """A partial file of `data`'s first `length` bytes with the sidecar a transfer from `url` writes."""
    import requests

    head = requests.head(fetch.shown_url(url), timeout=5).headers
    part.write_bytes(data[:length])
    fetch.sidecar_path(part).write_text(json.dumps({
        "url": fetch.shown_url(url), "source": fetch._source_key(url), "etag": head["ETag"],
        "last_modified": head["Last-Modified"], "total": len(data), **meta}))


def test_a_partial_from_another_url_of_the_same_path_is_not_resumed(blob, tmp_path):
    # The shown URL drops the query: ?file=a and ?file=b look alike there, and must not be stitched together.
    part, data = tmp_path / "out.part", blob.read_bytes()
    with WeightServer(blob.parent) as server:
        file_a, file_b, limits = (server.url_for(FILE_NAME) + "?file=a", server.url_for(FILE_NAME) + "?file=b",
                                  fetch.Limits(max_bytes=10 * 1024 * KB))
        _partial_for(part, file_a, data, 300 * KB)
        fetched = fetch.fetch(file_b, part, limits=limits)
        again = tmp_path / "again.part"
        _partial_for(again, file_a, data, 300 * KB)
        resumed = fetch.fetch(file_a, again, limits=limits)
    assert fetched.resumed_from == 0 and fetched.sha256 == hashlib.sha256(data).hexdigest()
    assert resumed.resumed_from == 300 * KB and resumed.sha256 == fetched.sha256


def test_a_partial_of_another_size_is_started_again_not_stitched(blob, tmp_path):
    # A weak or shared validator can let a Range through onto another file; its size still tells them apart.
    part, data = tmp_path / "out.part", blob.read_bytes()
    with WeightServer(blob.parent) as server:
        url = server.url_for(FILE_NAME)
        _partial_for(part, url, data, 300 * KB, total=len(data) + 4096)
        fetched = fetch.fetch(url, part, limits=fetch.Limits(max_bytes=10 * 1024 * KB))
    assert fetched.resumed_from == 0 and fetched.sha256 == hashlib.sha256(data).hexdigest()
