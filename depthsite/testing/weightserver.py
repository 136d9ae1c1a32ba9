"""A loopback HTTP server of weight files for download tests: Range/ETag on demand, injected faults, counters.

In-process: `with WeightServer(folder) as server: ... server.url_for("x.pt")`; `server.configure(...)` sets
the behaviour (no Range support, drop the connection after N bytes, an HTML page, an error status n times,
a byte rate, no Content-Length, an endless body, a gzip-encoded body, a lying Content-Length), and
`server.requests` / `server.bytes_sent` say what was asked for and sent.
As a process: `python -m depthsite.testing.weightserver DIR [--port P] [--no-range] [--rate BYTES_PER_S] [--no-length]
[--endless] [--gzip]`.
"""
from __future__ import annotations

import argparse
import email.utils
import gzip
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024
POLL_INTERVAL = 0.02  # seconds between serve_forever's looks for shutdown()
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
             b"<body><h1>Please sign in to continue</h1></body></html>\n")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Behaviour:
    """What the server does; every field can be changed between (or during) requests."""

    ranges: bool = True  # honour Range (and If-Range); off: always answer 200 with the whole file
    etag: bool = True  # send ETag and Last-Modified
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drop_times: int = 1  # ... on this many responses
    html: bool = False  # answer 200 with an HTML page
    html_content_type: str = "text/html; charset=utf-8"
    status: int | None = None  # answer this status ...
    status_times: int = 1  # ... this many times (-1: always), then serve normally
    rate: float | None = None  # bytes per second of the body (slow mode)
    length: bool = True  # send Content-Length; off: the body ends when the connection closes
    endless: bool = False  # after the file, keep sending filler bytes until the client hangs up ...
    endless_bytes: int = 256 * 1024 * 1024  # ... or this many were sent (a client without a cap must not fill the disk)
    gzip: bool = False  # send the file gzip-compressed with Content-Encoding: gzip (whatever was asked)
    declared_length: int | None = None  # a Content-Length that lies (with endless, a huge one)


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int
    body_bytes: int = 0
    dropped: bool = False


@dataclass
class _State:
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server_version = "weightserver/1"
    state: _State
    root: Path

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # tests read the counters; a line per request would drown pytest's output

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _record(self, status: int) -> Served:
        served = Served(self.command, urlsplit(self.path).path, self.headers.get("Range"),
                        self.headers.get("If-Range"), status)
        with self.state.lock:
            self.state.requests.append(served)
        return served

    def _take(self, attribute: str) -> bool:
        """Use up one of the faults counted by `<attribute>_times`; True while some are left."""
        behaviour = self.state.behaviour
        with self.state.lock:
            left = getattr(behaviour, f"{attribute}_times")
            if left == 0:
                return False
            if left > 0:
                setattr(behaviour, f"{attribute}_times", left - 1)
            return True

    def _simple(self, status: int, body: bytes, content_type: str = "text/plain", head: bool = False) -> None:
        served = self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            served.body_bytes = len(body)

    def _serve(self, *, head: bool) -> None:
        behaviour = self.state.behaviour
        if behaviour.status is not None and self._take("status"):
            return self._simple(behaviour.status, f"status {behaviour.status}\n".encode(), head=head)
        if behaviour.html:
            return self._simple(200, HTML_PAGE, behaviour.html_content_type, head=head)
        relative = unquote(urlsplit(self.path).path).lstrip("/")
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return self._simple(404, b"not found\n", head=head)

        stat = path.stat()
        size = stat.st_size
        etag = f'"{stat.st_mtime_ns:x}-{size:x}"'
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if wanted and behaviour.ranges:
            if_range = self.headers.get("If-Range")
            unchanged = if_range is None or if_range in (etag, last_modified)
            match = _RANGE.match(wanted.strip())
            if match and unchanged:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size or start > end:
                    served = self._record(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                status = 206

        if behaviour.gzip:
            return self._serve_gzip(path, etag, head)
        served = self._record(status)
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if behaviour.declared_length is not None:
            self.send_header("Content-Length", str(behaviour.declared_length))
        elif behaviour.length and not behaviour.endless:
            self.send_header("Content-Length", str(length))
        else:
            self.close_connection = True  # HTTP/1.0 style: the end of the body is the end of the connection
        if behaviour.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if behaviour.etag:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
        self.end_headers()
        if head:
            return None

        drop_at = None
        if behaviour.drop_after is not None and self._take("drop"):
            drop_at = behaviour.drop_after
        with open(path, "rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0:
                chunk = handle.read(min(CHUNK, remaining))
                if drop_at is not None and served.body_bytes + len(chunk) >= drop_at:
                    chunk = chunk[: max(0, drop_at - served.body_bytes)]
                    self._send(chunk, served)
                    served.dropped = True
                    # A hard close mid-body: the client sees fewer bytes than Content-Length promised.
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return None
                if not self._send(chunk, served):
                    return None
                remaining -= len(chunk)
                if behaviour.rate:
                    time.sleep(len(chunk) / behaviour.rate)
        if behaviour.endless:
            filler = b"\x00" * CHUNK
            left = behaviour.endless_bytes
            while left > 0 and self._send(filler, served):  # until the client hangs up
                left -= len(filler)
                if behaviour.rate:
                    time.sleep(len(filler) / behaviour.rate)
        return None

    def _serve_gzip(self, path: Path, etag: str, head: bool) -> None:
        body = gzip.compress(path.read_bytes(), compresslevel=1)
        served = self._record(200)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        if not head:
            self._send(body, served)
        return None

    def _send(self, chunk: bytes, served: Served) -> bool:
        try:
            self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            served.dropped = True  # the client went away (a killed downloader)
            return False
        served.body_bytes += len(chunk)
        return True


class WeightServer:
    """A ThreadingHTTPServer on 127.0.0.1 (random port) serving the files of one folder."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root).resolve()
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state, "root": self.root})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"

    @property
    def behaviour(self) -> Behaviour:
        return self.state.behaviour

    def configure(self, **changes) -> Behaviour:
        """Start from the default behaviour with `changes` applied (e.g. ranges=False, status=500, status_times=2)."""
        with self.state.lock:
            self.state.behaviour = Behaviour(**changes)
        return self.state.behaviour

    @property
    def requests(self) -> list[Served]:
        with self.state.lock:
            return list(self.state.requests)

    def gets(self, name: str | None = None) -> list[Served]:
        return [r for r in self.requests if r.method == "GET" and (name is None or r.path.endswith("/" + name))]

    @property
    def bytes_sent(self) -> int:
        return sum(r.body_bytes for r in self.requests)

    def reset_counters(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def start(self) -> "WeightServer":
        # serve_forever looks for shutdown() every poll_interval (0.5 s by default): every test's teardown waited
        # for it, about 14 s of a registry run's 50.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL},
                                        name="weightserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "WeightServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m depthsite.testing.weightserver",
                                     description="Serve a folder of weight files on 127.0.0.1 for download tests.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--no-range", action="store_true", help="ignore Range requests (always 200)")
    parser.add_argument("--rate", type=float, help="bytes per second (slow mode)")
    parser.add_argument("--no-length", action="store_true", help="send no Content-Length (close to end the body)")
    parser.add_argument("--endless", action="store_true", help="after the file, send filler bytes forever")
    parser.add_argument("--gzip", action="store_true", help="send bodies gzip-encoded (Content-Encoding: gzip)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    server = WeightServer(args.folder, port=args.port)
    server.configure(ranges=not args.no_range, rate=args.rate, length=not args.no_length, endless=args.endless,
                     gzip=args.gzip)
    print(f"serving {server.root} at {server.url}/ (Ctrl-C to stop)", flush=True)
    # SIGTERM stops it like Ctrl-C (a background job ignores SIGINT), so the request log is printed either way.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.httpd.serve_forever(poll_interval=POLL_INTERVAL)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        for served in server.requests:
            print(f"{served.method} {served.path} range={served.range} -> {served.status} "
                  f"{served.body_bytes} bytes{' (dropped)' if served.dropped else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
