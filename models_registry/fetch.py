"""Fetch one file into a partial file: over HTTP(S), resumable and retried, or copied from a file:// folder.

Django-free: no settings, no rows, no wording for users. The download's transfer (services/transfer.py) decides
where the partial file lives, what limits apply, what a failure means for the model, and how to say it.
What this module knows is bytes: it streams them into `part`, hashes them as they come, stops at the byte
limit, never decodes a compressed body, and keeps a sidecar (`part` + ".json") with the source's validator so
that an interrupted transfer resumes with Range/If-Range instead of starting again.

Retries: urllib3's `Retry` handles connection errors and answers worth another try (408, 429, 5xx, honouring
Retry-After) with exponential backoff; DNS and TLS failures are not retried (they do not heal in seconds).
A body cut short after some bytes moved is resumed by `fetch` itself: urllib3 cannot resume a body. Attempts
that move no byte forward count towards RETRY_ATTEMPTS; attempts that do count towards RESUME_ATTEMPTS instead, so
that a server dropping every connection after a few bytes cannot hold the worker forever. The sha256 of the bytes
so far is carried from one attempt to the next: a resume hashes only the new bytes.

Redirects are followed here, not by requests, so that each hop is checked before it is contacted: only http(s),
never from https down to http, at most MAX_REDIRECTS, and never from a public host to a private, loopback,
link-local or otherwise non-global address (`host_is_public`). Whether a hop was public is taken from the address
that answered it; once one did, the address each later answer came from is checked too (a name may resolve
elsewhere at connect time than when checked: DNS rebinding), and such an answer is never read, although its request
was sent. Through a proxy the answering address is the proxy's, so only the names are checked there. The URL the
operator configured is trusted whatever it points at (an internal mirror is normal); what a server on the internet
answers is not: a redirect must not turn the worker into a probe of the site's own network.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from models_registry import cachefs
from models_registry.formats.sniff import HTML_STARTS

logger = logging.getLogger(__name__)

# Module constants rather than settings: operators never need them, tests shrink them.
RETRY_ATTEMPTS = 4  # attempts in a row that move no byte forward before giving up
RESUME_ATTEMPTS = 32  # resumes of one fetch after a connection that broke having moved bytes forward
MAX_REDIRECTS = 10
RETRY_BACKOFF_SECONDS = 1.0  # doubled after each failed attempt
CONNECT_TIMEOUT_SECONDS = 15
READ_TIMEOUT_SECONDS = 60  # a stalled server fails the attempt instead of holding the model's lock forever
CHUNK_BYTES = 1024 * 1024
SIDECAR_SUFFIX = ".json"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# IPv6 forms that carry an IPv4 address (NAT64's well-known prefix); the IPv4 address decides.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")

Progress = Callable[[int, "int | None"], None]  # (bytes done, total or None); called as bytes arrive


class FetchError(Exception):
    """A fetch that failed, as facts: `kind` says which way, the rest is what the caller needs to word it.

    kinds: "unreachable" (gave up: no connection, DNS, TLS, timeouts, 5xx, too many interruptions; `code` says
    which), "http" (an answer that is no file and will not become one: 401/403/404/410, other 4xx), "redirect"
    (a redirect that is not followed; `code` says why: download_redirect_scheme, _downgrade, _internal, _loop),
    "not_found" (no such file in a file:// folder), "html" (an HTML page instead of weights), "encoded" (a
    Content-Encoding although identity was asked), "too_large" (declared or sent beyond `limit`),
    "size_mismatch" (a declared size other than the exact size required).
    """

    def __init__(self, kind: str, what: str, *, code: str = "", status: int | None = None, attempts: int = 1,
                 partial: int = 0, size: int = 0, limit: int = 0, declared: bool = False, encoding: str = ""):
        super().__init__(what)
        self.kind = kind
        self.what = what
        self.code = code or f"download_{kind}"
        self.status = status
        self.attempts = attempts
        self.partial = partial  # bytes kept in the partial file for the next fetch to resume from
        self.size = size
        self.limit = limit
        self.declared = declared
        self.encoding = encoding


class _Transient(Exception):
    """An attempt worth repeating (a body cut short, a bad resume); `code`/`what` describe it at the end."""

    def __init__(self, what: str, *, code: str = "download_interrupted", status: int | None = None):
        super().__init__(what)
        self.code, self.what, self.status = code, what, status


@dataclass(frozen=True)
class Limits:
    """What a fetch may bring: at most `max_bytes`; exactly `exact_size` when known (a pinned file); and
    `ensure_room(folder, bytes_to_write)`, which raises (the caller's own error) when the disk is too full."""

    max_bytes: int
    exact_size: int | None = None
    ensure_room: Callable[[Path, int], None] = lambda folder, needed: None


@dataclass
class _Hashed:
    """The sha256 of the partial file's first `length` bytes, carried from one attempt to the next: hashing the
    partial file again on every resume costs time quadratic in its size when a server keeps dropping."""

    digest: Any = field(default_factory=lambda: hashlib.sha256())
    length: int = 0


@dataclass(frozen=True)
class Fetched:
    sha256: str
    size: int
    resumed_from: int


def host_of(url: str) -> str:
    """The host (and port) of a URL, without any user:password a mirror URL may carry."""
    parts = urlsplit(url)
    return f"{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}"


def shown_url(url: str) -> str:
    """The URL as it may be shown or recorded: scheme, host and path, never credentials or a query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{host_of(url) if parts.hostname else ''}{parts.path}"


def _address_is_global(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # a link-local IPv6 address may carry a %scope
    except ValueError:  # not an address
        return False
    if ip.version == 6:
        # An IPv6 spelling of an IPv4 address (mapped, 6to4, NAT64) is as internal as the address it carries.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def address_is_public(address: str) -> bool:
    """Whether one IP address is on the public internet (what host_is_public asks of every address of a name).
    A module function so that tests can make a loopback peer play a public one."""
    return _address_is_global(address)


def _peer_address(response: requests.Response) -> tuple[bool, str | None]:
    """(direct, the IP address the response came from). Recorded by the connection when it connected
    (_PeerConnectionPool): by the time a short answer is seen, http.client may have let go of its socket.
    A response through a proxy comes from urllib3's own proxy pools, which record nothing: not direct."""
    return hasattr(response.raw, "peer_address"), getattr(response.raw, "peer_address", None)


class _PeerHTTPConnection(HTTPConnection):
    """An HTTP connection that notes the address it reached (what a name resolved to at connect time)."""

    peer_address: str | None = None

    def connect(self) -> None:
        super().connect()
        try:
            self.peer_address = self.sock.getpeername()[0]
        except (OSError, IndexError, TypeError, AttributeError):
            self.peer_address = None


class _PeerHTTPSConnection(_PeerHTTPConnection, HTTPSConnection):
    pass


class _PeerConnectionPool(HTTPConnectionPool):
    """Hands each response the address its connection reached (a reused keep-alive connection keeps its own)."""

    ConnectionCls = _PeerHTTPConnection

    def _make_request(self, conn, *args, **kwargs):
        response = super()._make_request(conn, *args, **kwargs)
        response.peer_address = getattr(conn, "peer_address", None)
        return response


class _PeerHTTPSConnectionPool(_PeerConnectionPool, HTTPSConnectionPool):
    ConnectionCls = _PeerHTTPSConnection


class _PeerAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PeerConnectionPool, "https": _PeerHTTPSConnectionPool}


def host_is_public(host: str) -> bool:
    """Whether every address `host` resolves to is on the public internet (not private, loopback, link-local,
    shared, reserved or multicast). A name that does not resolve is not public either: redirects from a public
    server are followed only to hosts that are, and nothing is said about which internal names exist.

    A module function so that tests can make a loopback server play a public one."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError, ValueError):
        return False
    return bool(addresses) and all(_address_is_global(address) for address in addresses)


# --- the partial file and its sidecar ---------------------------------------------------------------


def sidecar_path(part: Path) -> Path:
    return part.with_name(part.name + SIDECAR_SUFFIX)


def discard(part: Path) -> None:
    """Forget a partial transfer: the bytes and the sidecar."""
    part.unlink(missing_ok=True)
    sidecar_path(part).unlink(missing_ok=True)


def partial_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _read_sidecar(part: Path) -> dict[str, Any]:
    try:
        data = json.loads(sidecar_path(part).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_sidecar(part: Path, **values: Any) -> None:
    with cachefs.atomic_write(sidecar_path(part)) as tmp:
        tmp.write_text(json.dumps({**values, "written": dt.datetime.now(dt.timezone.utc).isoformat()}))


def _source_key(url: str) -> str:
    """What a sidecar keeps to recognise its source: an HMAC of the whole URL (query and credentials included),
    keyed with the site's SECRET_KEY, which is not in the cache folder: whoever reads the sidecar can neither read
    the URL's password or signature nor test guesses of them."""
    from django.conf import settings

    return hmac.new(str(settings.SECRET_KEY).encode("utf-8"), url.encode("utf-8"), "sha256").hexdigest()


def _same_source(meta: dict[str, Any], url: str) -> bool:
    if "source" in meta:
        return meta["source"] == _source_key(url)
    return meta.get("url") == url  # a sidecar of an earlier release, which recorded the whole URL


def _resume_point(part: Path, url: str) -> tuple[int, str, int | None]:
    """(offset, If-Range validator, the whole file's size as recorded) for continuing a partial file; (0, "",
    None) and no partial when it cannot be."""
    size = partial_size(part)
    if not size:
        return 0, "", None
    meta = _read_sidecar(part)
    etag = meta.get("etag") or ""
    # If-Range needs a strong validator: a weak ETag or none at all falls back to Last-Modified.
    validator = etag if etag and not etag.startswith("W/") else meta.get("last_modified") or ""
    total = meta.get("total")
    if not _same_source(meta, url) or not validator or (total is not None and size > total):
        logger.info("%s: cannot resume (different source or no validator); starting again", part.name)
        discard(part)
        return 0, "", None
    if "source" not in meta:  # an earlier release's sidecar, which may hold a password: rewritten without it
        _write_sidecar(part, url=shown_url(url), source=_source_key(url), etag=meta.get("etag", ""),
                       last_modified=meta.get("last_modified", ""), total=total)
    if total is not None and size == total:
        # Complete but never accepted (the process died while checking it): fetch the last byte again,
        # which proves with If-Range that the server's file is still the one these bytes came from.
        with open(part, "rb+") as handle:
            handle.truncate(total - 1)
        size = total - 1
    return size, validator, total


def _hash_prefix(part: Path, length: int) -> "hashlib._Hash":
    digest = hashlib.sha256()
    if length:
        with open(part, "rb") as handle:
            while chunk := handle.read(min(CHUNK_BYTES * 4, length - handle.tell())):
                digest.update(chunk)
    return digest


# --- HTTP ------------------------------------------------------------------------------------------


class _Retry(Retry):
    """urllib3's Retry, except that a host name that does not resolve or a TLS handshake that fails gives up
    at once: waiting seconds between attempts fixes neither."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if error is not None and _final_kind(error):
            raise urllib3.exceptions.MaxRetryError(_pool, url, error) from error
        return super().increment(method, url, response, error, _pool, _stacktrace)


def _final_kind(error: BaseException) -> str:
    """"dns" or "tls" when the error (or one it wraps) is a name that does not resolve or a failed TLS
    handshake; "" otherwise."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen or not isinstance(link, BaseException):
            continue
        seen.add(id(link))
        if isinstance(link, (socket.gaierror, urllib3.exceptions.NameResolutionError)):
            return "dns"
        if isinstance(link, (urllib3.exceptions.SSLError, requests.exceptions.SSLError)):
            return "tls"
        pending.extend([getattr(link, "reason", None), link.__cause__, link.__context__, *link.args])
    return ""


def _session(user_agent: str) -> requests.Session:
    session = requests.Session()
    tries = RETRY_ATTEMPTS - 1
    retry = _Retry(total=tries, connect=tries, read=tries, other=0, status=tries, status_forcelist=RETRY_STATUSES,
                   allowed_methods={"GET"}, backoff_factor=RETRY_BACKOFF_SECONDS, respect_retry_after_header=True,
                   raise_on_status=False)
    adapter = _PeerAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # identity: Content-Length and Range then count the file's own bytes, not a compressed stream.
    session.headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
    return session


def _connection_problem(exc: requests.RequestException, url: str) -> tuple[str, str, int]:
    """(code, what failed, attempts made) for an error raised before any response came."""
    host = host_of(url)
    final = _final_kind(exc)
    if final == "tls":
        return ("download_tls", f"the TLS handshake with {host} failed (certificate not trusted, or not a TLS "
                                "server)", 1)
    if final == "dns":
        return "download_dns", f"the host name {urlsplit(url).hostname} does not resolve (DNS)", 1
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "download_timeout", f"connecting to {host} timed out after {CONNECT_TIMEOUT_SECONDS} s", RETRY_ATTEMPTS
    if isinstance(exc, requests.Timeout):
        return "download_timeout", f"{host} stopped answering for {READ_TIMEOUT_SECONDS} s", RETRY_ATTEMPTS
    return ("download_unreachable", f"cannot connect to {host} (connection refused, or no route to it)",
            RETRY_ATTEMPTS)


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, total) of a `Content-Range: bytes a-b/total` header; (-1, None) when unreadable."""
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        first = int(span.split("-")[0])
        return (first, None if total == "*" else int(total)) if unit == "bytes" else (-1, None)
    except ValueError:
        return -1, None


def _too_large(url: str, size: int, limit: int, *, declared: bool) -> FetchError:
    return FetchError("too_large", f"{shown_url(url)} {'declares' if declared else 'sent'} {size} bytes",
                      size=size, limit=limit, declared=declared)


def _redirect_target(url: str, location: str, *, status: int, public_seen: bool) -> str:
    """Where a redirect from `url` to `location` leads; FetchError when it must not be followed (see the
    module's docstring). `public_seen`: a public address has answered on the way here, so the target must be a
    public host. The refusal names the hop, never an address the target resolved to."""
    target = urljoin(url, location.strip())
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("redirect", f"{shown_url(url)} redirected to a {scheme}: URL; only http and https are "
                                     "followed", code="download_redirect_scheme", status=status)
    if not urlsplit(target).hostname:
        raise FetchError("redirect", f"{shown_url(url)} redirected to a URL without a host",
                         code="download_redirect_scheme", status=status)
    if urlsplit(url).scheme.lower() == "https" and scheme == "http":
        raise FetchError("redirect", f"{shown_url(url)} redirected from https to plain http ({host_of(target)}); "
                                     "refused", code="download_redirect_downgrade", status=status)
    if public_seen and not host_is_public(urlsplit(target).hostname):
        raise FetchError("redirect", f"{shown_url(url)} redirected to {host_of(target)}, which is not a public "
                                     "address; a server on the internet may not send the download into the site's "
                                     "own network", code="download_redirect_internal", status=status)
    return target


def _open(session: requests.Session, url: str, part: Path, headers: dict[str, str]) -> tuple[requests.Response, str]:
    """GET `url` with its redirects followed one checked hop at a time; the response and the URL that gave it.

    Credentials in `url` go to its own host only (as requests does): a hop elsewhere is asked without them."""
    hop = url
    user, password = requests.utils.get_auth_from_url(url)
    origin = urlsplit(url)
    public_seen = False  # once a public address has answered, every later hop must be public, name and answer
    for _ in range(MAX_REDIRECTS + 1):
        here = urlsplit(hop)
        same_origin = (here.scheme, here.hostname, here.port) == (origin.scheme, origin.hostname, origin.port)
        try:
            response = session.get(hop, headers=headers, stream=True, allow_redirects=False,
                                   auth=(user, password) if same_origin and (user or password) else None,
                                   timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS))
        except requests.RequestException as exc:
            code, what, attempts = _connection_problem(exc, hop)
            raise FetchError("unreachable", what, code=code, attempts=attempts, partial=partial_size(part)) from None
        direct, peer = _peer_address(response)
        if public_seen and direct and (peer is None or not address_is_public(peer)):
            # The name was public when checked and is not now (DNS rebinding): nothing it answered is read. The
            # request itself was sent; only connecting to the checked address would prevent that.
            response.close()
            raise FetchError("redirect", f"{shown_url(hop)} answered from an address that is not public (or not "
                                         "known) when it was contacted; a server on the internet may not send the "
                                         "download into the site's own network", code="download_redirect_internal",
                             status=response.status_code)
        location = response.headers.get("Location")
        if response.status_code not in REDIRECT_STATUSES or not location:
            return response, hop
        response.close()
        # Whether this hop was public is read from the address that answered, not from the name looked up again
        # (which its owner may have pointed elsewhere since); the name only where no address can be told.
        public_seen = public_seen or (address_is_public(peer) if peer is not None
                                      else host_is_public(urlsplit(hop).hostname or ""))
        hop = _redirect_target(hop, location, status=response.status_code, public_seen=public_seen)
    raise FetchError("redirect", f"{shown_url(url)} redirected more than {MAX_REDIRECTS} times",
                     code="download_redirect_loop", status=response.status_code)


def _http_attempt(session: requests.Session, url: str, part: Path, limits: Limits,
                  on_progress: Progress | None, hashed: _Hashed) -> Fetched:
    offset, validator, recorded = _resume_point(part, url)
    headers = {"Range": f"bytes={offset}-", "If-Range": validator} if offset else {}
    response, answered = _open(session, url, part, headers)
    with response:
        status = response.status_code
        if status in RETRY_STATUSES:  # urllib3 retried it and gave up
            raise FetchError("unreachable", f"{shown_url(answered)} answered {status} {response.reason}",
                             code="download_http_5xx" if status >= 500 else f"download_http_{status}",
                             status=status, attempts=RETRY_ATTEMPTS, partial=partial_size(part))
        if status == 416:
            discard(part)  # the server has less than our partial: it is not the same file
            raise _Transient(f"{shown_url(answered)} could not resume at byte {offset} (416); starting again")
        if status not in (200, 206):
            missing = status in (401, 403, 404, 410)
            raise FetchError("http", (f"{shown_url(answered)} answered {status} {response.reason}: "
                                      + ("the file is not there or access is denied" if missing
                                         else "not a weight file")),
                             code=f"download_http_{status}", status=status)
        content_type = response.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            raise FetchError("html", f"Content-Type {content_type}")
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # Identity was asked for: lengths, ranges and the disk check count the file's own bytes, and a
            # small compressed body must not expand into a big file. The body is never decoded.
            raise FetchError("encoded", f"Content-Encoding {encoding}", encoding=encoding)
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range", ""))
            if first != offset:
                discard(part)
                raise _Transient(f"{shown_url(answered)} resumed at byte {first} instead of {offset}; starting again")
            if recorded is not None and total != recorded:
                # A file of another size is another file, whatever a weak validator said: never stitch two.
                discard(part)
                raise _Transient(f"{shown_url(answered)} now has {total} bytes, not the {recorded} the partial file "
                                 "was from; starting again")
        else:
            if offset:
                logger.info("%s: the server sent the whole file (no Range support, or the file changed); "
                            "starting again from zero", shown_url(answered))
            offset = 0
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        if total is not None and limits.exact_size and total != limits.exact_size:
            raise FetchError("size_mismatch", f"{shown_url(url)} offers {total} bytes", size=total,
                             limit=limits.exact_size)
        if total is not None and total > limits.max_bytes:
            raise _too_large(url, total, limits.max_bytes, declared=True)
        limits.ensure_room(part.parent, (total if total is not None else limits.max_bytes) - offset)
        if offset == 0:
            # Written before the first body byte, so a transfer killed at any point can be resumed.
            _write_sidecar(part, url=shown_url(url), source=_source_key(url), etag=response.headers.get("ETag", ""),
                           last_modified=response.headers.get("Last-Modified", ""), total=total)
        if hashed.length != offset:  # the first attempt of a process, or the partial file was started again
            hashed.digest, hashed.length = _hash_prefix(part, offset), offset
        digest = hashed.digest
        done = offset
        if on_progress is not None:
            on_progress(done, total)
        with open(part, "rb+" if offset else "wb") as handle:
            handle.seek(offset)
            handle.truncate()
            sniff = offset == 0
            while True:
                try:
                    # The raw stream, never decoded (see Content-Encoding above); chunked framing is undone.
                    chunk = response.raw.read(CHUNK_BYTES, decode_content=False)
                except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                    handle.flush()
                    raise _Transient(f"the connection broke after {done} bytes: {exc}") from None
                if not chunk:
                    break
                if sniff:
                    if chunk.lstrip()[:64].lower().startswith(HTML_STARTS):
                        raise FetchError("html", "the body is HTML")
                    sniff = False
                if done + len(chunk) > limits.max_bytes:
                    raise _too_large(url, done + len(chunk), limits.max_bytes, declared=False)
                handle.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                hashed.length = done
                if on_progress is not None:
                    on_progress(done, total)
            handle.flush()
            os.fsync(handle.fileno())
    size = partial_size(part)
    if total is not None and size != total:
        raise _Transient(f"received {size} of {total} bytes")
    return Fetched(sha256=digest.hexdigest(), size=size, resumed_from=offset)


def _http_fetch(url: str, part: Path, limits: Limits, on_progress: Progress | None, user_agent: str) -> Fetched:
    failures = resumes = 0
    furthest = partial_size(part)
    hashed = _Hashed()
    with _session(user_agent) as session:
        while True:
            try:
                return _http_attempt(session, url, part, limits, on_progress, hashed)
            except _Transient as exc:
                size = partial_size(part)
                if size > furthest:
                    # A dropped connection that still moved bytes forward is not a failure, but the resumes are
                    # bounded too: the bytes stay for the next download, this one ends with a clear error.
                    furthest = size
                    resumes += 1
                    if resumes > RESUME_ATTEMPTS:
                        raise FetchError("unreachable", f"the connection broke {resumes} times before the file was "
                                                        f"complete ({size} bytes so far)",
                                         code="download_interrupted", attempts=resumes, partial=size) from None
                else:
                    failures += 1
                if failures >= RETRY_ATTEMPTS:
                    raise FetchError("unreachable", exc.what, code=exc.code, status=exc.status, attempts=failures,
                                     partial=size) from None
                delay = RETRY_BACKOFF_SECONDS * 2 ** max(failures - 1, 0)
                logger.warning("fetching %s: %s; retrying in %.1f s", shown_url(url), exc, delay)
                time.sleep(delay)


# --- file:// ---------------------------------------------------------------------------------------


def _file_copy(url: str, part: Path, limits: Limits, on_progress: Progress | None) -> Fetched:
    """Copy from a file:// folder with the same hashing and limits as a transfer (never resumed)."""
    folder_url, _, quoted_name = url.rpartition("/")
    folder = Path(url2pathname(urlsplit(folder_url).path))
    source = cachefs.contained(folder, cachefs.safe_name(unquote(quoted_name), what="the mirror file name"))
    if not source.is_file():
        raise FetchError("not_found", f"the mirror folder {source.parent} has no file {source.name}", status=404)
    total = source.stat().st_size
    if total > limits.max_bytes:
        raise _too_large(url, total, limits.max_bytes, declared=True)
    discard(part)
    limits.ensure_room(part.parent, total)
    digest = hashlib.sha256()
    done = 0
    if on_progress is not None:
        on_progress(0, total)
    with open(source, "rb") as reader, open(part, "wb") as handle:
        while chunk := reader.read(CHUNK_BYTES):
            if done + len(chunk) > limits.max_bytes:  # the file grew while it was copied
                raise _too_large(url, done + len(chunk), limits.max_bytes, declared=False)
            handle.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, total)
        handle.flush()
        os.fsync(handle.fileno())
    return Fetched(sha256=digest.hexdigest(), size=partial_size(part), resumed_from=0)


def fetch(url: str, part: Path, *, limits: Limits, on_progress: Progress | None = None,
          user_agent: str = "depthsite") -> Fetched:
    """Bring `url` (http, https or file) into `part`: the bytes and their sha256.

    FetchError on failure; with `partial` > 0 the bytes so far are kept (with the sidecar) for the next fetch
    to resume, otherwise nothing is left. Errors from `limits.ensure_room` and OSError from the disk pass
    through unchanged (the caller words a full disk)."""
    if url.startswith("file:"):
        return _file_copy(url, part, limits, on_progress)
    return _http_fetch(url, part, limits, on_progress, user_agent)
