"""The production server for real: `scripts/serve.sh all` (release, qcluster, gunicorn + whitenoise) on loopback.

`all` runs the same release step and gunicorn command line as the `web` role of the units and compose file.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.deploy.layout import ROOT, production_environ

HOST = "depth.example.org"  # DJANGO_ALLOWED_HOSTS in deploy/env/web.env
HTTPS = {"Host": HOST, "X-Forwarded-Proto": "https"}  # what the reverse proxy adds
PASSWORD = "a long pass phrase 7"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str, headers: dict[str, str], method: str = "GET", body: str | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def _cookies(response) -> dict[str, str]:
    """Each Set-Cookie header by cookie name, as sent (attributes included)."""
    return {header.split("=", 1)[0]: header for header in response.headers.get_all("Set-Cookie") or []}


def _wait_until_listening(port: int, server: subprocess.Popen, log: Path, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"serve.sh exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"gunicorn did not listen on {port} within {deadline_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_gunicorn_serves_pages_and_static_files_securely(tmp_path):
    environ = production_environ(tmp_path)
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(["scripts/serve.sh", "all", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
                                  cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_until_listening(port, server, log)
        assert "System check identified no issues" in log.read_text()  # release ran `check --deploy`
        create_user = "from django.contrib.auth.models import User; User.objects.create_user('ops', password=%r)"
        subprocess.run([sys.executable, "manage.py", "shell", "-c", create_user % PASSWORD],
                       cwd=ROOT, env=environ, check=True, capture_output=True, timeout=120)

        # Plain HTTP is redirected to HTTPS; a host outside DJANGO_ALLOWED_HOSTS is refused.
        response, _ = _get(port, "/", {"Host": HOST})
        assert response.status == 301 and response.getheader("Location") == f"https://{HOST}/"
        response, _ = _get(port, "/", {"Host": "evil.example.com", "X-Forwarded-Proto": "https"})
        assert response.status == 400

        # Over "HTTPS" (the proxy's header): HSTS, nosniff, and a Secure CSRF cookie on the login form.
        response, body = _get(port, "/accounts/login/", HTTPS)
        assert response.status == 200
        assert response.getheader("Strict-Transport-Security") == "max-age=31536000; includeSubDomains; preload"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        csrf_cookie = _cookies(response)["csrftoken"]
        assert "; Secure" in csrf_cookie
        csrf = SimpleCookie(csrf_cookie)["csrftoken"].value
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1).decode()

        # Signing in sets a Secure, HttpOnly session cookie; with it, `/` answers 200.
        form = urlencode({"username": "ops", "password": PASSWORD, "csrfmiddlewaretoken": token})
        response, _ = _get(port, "/accounts/login/", {
            **HTTPS, "Cookie": f"csrftoken={csrf}", "Origin": f"https://{HOST}",
            "Content-Type": "application/x-www-form-urlencoded"}, method="POST", body=form)
        assert response.status == 302, response.status
        session_cookie = _cookies(response)["sessionid"]
        assert "; Secure" in session_cookie and "; HttpOnly" in session_cookie
        session = SimpleCookie(session_cookie)["sessionid"].value
        response, body = _get(port, "/", {**HTTPS, "Cookie": f"sessionid={session}"})
        assert response.status == 200
        assert response.getheader("Strict-Transport-Security")

        # Static files come from whitenoise: hashed names cached for good, the bytes those collected.
        static_root = tmp_path / "var" / "static"
        manifest = json.loads((static_root / "staticfiles.json").read_text())["paths"]
        hashed = manifest["depthsite/dashboard.css"]
        assert re.search(r"\.[0-9a-f]{12}\.css$", hashed)
        assert any(f'"/static/{name}"'.encode() in body for name in manifest.values()), "the page links hashed names"
        response, content = _get(port, f"/static/{hashed}", HTTPS)
        assert response.status == 200
        cache_control = response.getheader("Cache-Control")
        assert "immutable" in cache_control
        assert int(re.search(r"max-age=(\d+)", cache_control).group(1)) >= 365 * 24 * 3600
        assert content == (static_root / hashed).read_bytes()
        response, _ = _get(port, "/static/depthsite/dashboard.css", HTTPS)
        assert response.status == 200 and "immutable" not in response.getheader("Cache-Control")
        response, content = _get(port, f"/static/{hashed}", {**HTTPS, "Accept-Encoding": "gzip"})
        assert response.getheader("Content-Encoding") == "gzip"
        response, _ = _get(port, "/static/../depthsite.sqlite3", HTTPS)
        assert response.status == 404

        # Debug is off: an unknown page is a plain 404, not Django's URL listing.
        response, body = _get(port, "/no-such-page/", HTTPS)
        assert response.status == 404 and b"URLconf" not in body
        commands = _group_commands(server.pid)
        assert any("manage.py qcluster" in command for command in commands), commands
        assert any("gunicorn" in command for command in commands), commands

        # SIGTERM to the script alone (as systemd or a shell's kill sends it) stops gunicorn and the cluster.
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        assert server.returncode == 143, log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while _group_alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(server.pid), "a gunicorn or qcluster process outlived serve.sh"
    finally:
        if _group_alive(server.pid):
            os.killpg(server.pid, signal.SIGKILL)
        if server.poll() is None:
            server.wait(timeout=10)


def _group_commands(pgid: int) -> list[str]:
    """Command lines of the processes in a process group (Linux /proc)."""
    commands = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                commands.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return commands


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
