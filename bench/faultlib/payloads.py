"""Bad uploads and bad API payloads against a live `runserver` on 127.0.0.1: never a 5xx, always a 4xx that says why.

Each case is one real HTTP request (requests, or a raw socket where requests would fix the mistake for us)
to the predictions API, the upload form or the models API, signed in as whoever the case needs. A case
passes when the status is 4xx and the body (JSON `message`/`extra`, or the form page) names the problem:
one of the case's words appears in it.
"""
from __future__ import annotations

import io
import json
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import requests
from PIL import Image

from bench.faultlib.common import MANAGE, PYTHON, Result, Workspace, free_port, manage, spawn, stop
from depthsite.testing import images

UPLOAD_LIMIT = 2 * 1000**2
USERS = """
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
User = get_user_model()
staff = User.objects.create_superuser("bench-staff", "staff@example.com", "pw-bench-staff-1")
user = User.objects.create_user("bench-user", "user@example.com", "pw-bench-user-1")
print(Token.objects.create(user=staff).key, Token.objects.create(user=user).key)
"""


@dataclass
class Case:
    name: str
    send: Callable[["Client"], requests.Response | tuple[int, str]]
    names: tuple[str, ...]  # any of these words in the body names the problem
    area: str = "predictions"


@dataclass
class Client:
    base: str
    staff: str
    user: str
    port: int
    cookies: dict = field(default_factory=dict)

    def api(self, method: str, path: str, *, who: str = "user", **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if who != "anonymous":
            headers["Authorization"] = f"Token {self.staff if who == 'staff' else self.user}"
        return requests.request(method, self.base + path, headers=headers, timeout=120, **kwargs)

    def raw(self, request: bytes) -> tuple[int, str]:
        """Send bytes as they are (a malformed request requests would not produce); (status, body)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        return (int(match.group(1)) if match else 0), body.decode(errors="replace")

    def form(self, data: dict, files: dict | None = None, *, csrf: bool = True) -> requests.Response:
        session = requests.Session()
        session.get(self.base + "/", timeout=60)
        token = session.cookies.get("csrftoken", "")
        data = {**data, **({"csrfmiddlewaretoken": token} if csrf else {})}
        return session.post(self.base + "/", data=data, files=files, timeout=120,
                            headers={"Referer": self.base + "/"})


def _jpeg() -> bytes:
    return images.jpeg()


def _raw_multipart(client: Client, path: str, body: bytes, content_type: str) -> tuple[int, str]:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\nAuthorization: Token {client.user}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return client.raw(head + body)


def _post(files=None, data=None, **kwargs):
    return lambda c: c.api("POST", "/api/predictions/", files=files, data=data, **kwargs)


def _staff_json(method: str, path: str, body, *, raw: bool = False, content_type="application/json"):
    def send(c: Client):
        payload = body if raw else json.dumps(body)
        return c.api(method, path, who="staff", data=payload, headers={"Content-Type": content_type})
    return send


def _png_of(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def cases() -> list[Case]:
    jpeg = _jpeg()
    rid = str(uuid.uuid4())
    return [
        # --- predictions API: the photo
        Case("no image field", _post(data={"model": "MiDaS_small"}), ("image",)),
        Case("image sent as a text field", _post(data={"image": "not a file"}), ("image",)),
        Case("empty image file", _post(files={"image": ("a.jpg", b"")}), ("image", "empty")),
        Case("text file named .jpg", _post(files={"image": ("a.jpg", b"hello, world\n" * 20)}), ("image",)),
        Case("truncated JPEG", _post(files={"image": ("a.jpg", jpeg[: len(jpeg) // 2])}), ("image", "truncated")),
        Case("JPEG header only", _post(files={"image": ("a.jpg", jpeg[:200])}), ("image",)),
        Case("PNG bomb 400 MP", _post(files={"image": ("bomb.png", images.png_bomb())}), ("image", "pixel")),
        Case("over the upload limit", _post(files={"image": ("big.jpg", jpeg + b"\0" * (UPLOAD_LIMIT + 1))}),
             ("image", "limit")),
        Case("HTML page as image", _post(files={"image": ("a.png", b"<!DOCTYPE html><html></html>")}), ("image",)),
        Case("SVG image", _post(files={"image": ("a.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')}),
             ("image",)),
        Case("zero-width PNG header", _post(files={"image": ("z.png", _png_of((1, 1))[:16] + b"\0" * 40)}),
             ("image",)),
        # --- predictions API: the other fields
        Case("unknown model", _post(files={"image": ("a.jpg", jpeg)}, data={"model": "NoSuchModel"}), ("model",)),
        Case("model name of 100 KB", _post(files={"image": ("a.jpg", jpeg)}, data={"model": "m" * 100_000}),
             ("model",)),
        Case("model with a NUL byte", _post(files={"image": ("a.jpg", jpeg)}, data={"model": "MiDaS\0small"}),
             ("model",)),
        Case("unknown output format", _post(files={"image": ("a.jpg", jpeg)}, data={"outputs": "gif"}),
             ("outputs",)),
        Case("outputs list of 100 000", _post(files={"image": ("a.jpg", jpeg)}, data={"outputs": "png," * 100_000}),
             ("outputs",)),
        Case("unknown colormap", _post(files={"image": ("a.jpg", jpeg)}, data={"colormap": "rainbow"}),
             ("colormap",)),
        Case("unknown field", _post(files={"image": ("a.jpg", jpeg)}, data={"priority": "high"}), ("priority",)),
        Case("JSON body instead of multipart",
             lambda c: c.api("POST", "/api/predictions/", json={"image": "aGVsbG8=", "model": "MiDaS_small"}),
             ("media type", "content type", "application/json")),
        Case("text/plain body", lambda c: c.api("POST", "/api/predictions/", data=b"image=x",
                                                headers={"Content-Type": "text/plain"}),
             ("media type", "content type", "text/plain")),
        Case("multipart without boundary",
             lambda c: _raw_multipart(c, "/api/predictions/", b"--x\r\n\r\n", "multipart/form-data"),
             ("multipart", "boundary")),
        Case("multipart cut in the middle",
             lambda c: _raw_multipart(c, "/api/predictions/",
                                      b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
                                      b"Content-Type: image/jpeg\r\n\r\n" + jpeg[:300],
                                      "multipart/form-data; boundary=XX"),
             ("image", "multipart")),
        Case("file name of 10 KB", _post(files={"image": ("n" * 10_000 + ".jpg", b"not an image")}),
             ("image", "header")),
        # --- predictions API: ids and methods
        Case("malformed job id", lambda c: c.api("GET", "/api/predictions/not-a-uuid/"), ("prediction", "id")),
        Case("unknown job id", lambda c: c.api("GET", f"/api/predictions/{rid}/"), ("prediction", rid)),
        Case("unknown result format", lambda c: c.api("GET", f"/api/predictions/{rid}/files/gif/"),
             ("prediction", "gif", "format")),
        Case("delete an unknown job", lambda c: c.api("DELETE", f"/api/predictions/{rid}/"), ("prediction", rid)),
        Case("PUT on the collection", lambda c: c.api("PUT", "/api/predictions/", data={}), ("put", "method")),
        Case("bad token", lambda c: c.api("GET", "/api/predictions/", who="anonymous",
                                         headers={"Authorization": "Token nope"}), ("token",)),
        # --- models API
        Case("download an unknown model", _staff_json("POST", "/api/models/NoSuchModel/download", {}),
             ("nosuchmodel", "model"), "models"),
        Case("convert to an unknown format", _staff_json("POST", "/api/models/MiDaS_small/convert",
                                                         {"format": "gif"}), ("format",), "models"),
        Case("convert without a format", _staff_json("POST", "/api/models/MiDaS_small/convert", {}),
             ("format",), "models"),
        Case("convert with a number format", _staff_json("POST", "/api/models/MiDaS_small/convert", {"format": 123}),
             ("format",), "models"),
        Case("convert with a list body", _staff_json("POST", "/api/models/MiDaS_small/convert", ["h5"]),
             ("format", "dict", "object", "list"), "models"),
        Case("broken JSON", _staff_json("POST", "/api/models/MiDaS_small/convert", '{"format": ', raw=True),
             ("json", "parse"), "models"),
        Case("JSON nested 100 000 deep", _staff_json("POST", "/api/models/cache/optimize", _deep_json(100_000),
                                                     raw=True), ("json", "parse", "deep", "nest"), "models"),
        Case("JSON body of 5 MB", _staff_json("POST", "/api/models/cache/optimize",
                                              json.dumps({"dry_run": True, "pad": "x" * 5_000_000}), raw=True),
             ("large", "big", "size", "limit", "pad"), "models"),
        Case("convert as text/plain", _staff_json("POST", "/api/models/MiDaS_small/convert", "format=h5", raw=True,
                                                  content_type="text/plain"),
             ("media type", "content type", "text/plain"), "models"),
        Case("export in an unknown format", lambda c: c.api("GET", "/api/models/MiDaS_small/export?format=xyz",
                                                            who="staff"), ("format",), "models"),
        Case("export with bundle=maybe", lambda c: c.api("GET", "/api/models/MiDaS_small/export?format=pt&bundle=maybe",
                                                         who="staff"), ("bundle",), "models"),
        Case("clear without confirm", _staff_json("POST", "/api/models/cache/clear", {}), ("confirm",), "models"),
        Case("clear with confirm as text", _staff_json("POST", "/api/models/cache/clear", {"confirm": "yes please"}),
             ("confirm",), "models"),
        Case("clear an unknown model", _staff_json("POST", "/api/models/cache/clear",
                                                   {"confirm": True, "model": "NoSuchModel"}),
             ("nosuchmodel", "model"), "models"),
        Case("optimize with dry_run=perhaps", _staff_json("POST", "/api/models/cache/optimize", {"dry_run": "perhaps"}),
             ("dry_run",), "models"),
        Case("optimize with a negative size", _staff_json("POST", "/api/models/cache/optimize", {"max_bytes": -5}),
             ("max_bytes",), "models"),
        Case("optimize with an unknown field", _staff_json("POST", "/api/models/cache/optimize",
                                                           {"dry_run": True, "everything": True}),
             ("everything",), "models"),
        Case("import without a file", lambda c: c.api("POST", "/api/models/import", who="staff",
                                                      files={"model": (None, "MiDaS_small")}), ("file",), "models"),
        Case("import a text file", lambda c: c.api("POST", "/api/models/import", who="staff",
                                                   files={"file": ("w.pt", b"hello\n" * 100)}),
             ("file", "weight", "w.pt"), "models"),
        Case("import an HTML page", lambda c: c.api("POST", "/api/models/import", who="staff",
                                                    files={"file": ("w.pt", b"<!DOCTYPE html><html></html>")}),
             ("html",), "models"),
        Case("import as JSON", _staff_json("POST", "/api/models/import", {"file": "aGVsbG8="}),
             ("media type", "content type", "multipart"), "models"),
        Case("unknown download id", lambda c: c.api("GET", "/api/models/downloads/999999", who="staff"),
             ("download", "999999"), "models"),
        Case("download id past 64 bits", lambda c: c.api("GET", "/api/models/downloads/" + "9" * 30, who="staff"),
             ("download",), "models"),
        Case("convert as a non-staff user", lambda c: c.api("POST", "/api/models/MiDaS_small/convert",
                                                           json={"format": "h5"}), ("staff", "permission"), "models"),
        Case("import anonymously", lambda c: c.api("POST", "/api/models/import", who="anonymous",
                                                   files={"file": ("w.pt", b"x")}),
             ("credentials", "authentication", "sign in", "log in"), "models"),
        # --- the upload form
        Case("form without an image", lambda c: c.form({"model": "MiDaS_small", "colormap": "inferno",
                                                        "outputs": "png"}), ("image",), "form"),
        Case("form with a text file", lambda c: c.form({"model": "MiDaS_small", "colormap": "inferno", "outputs": "png"},
                                                       {"image": ("a.jpg", b"hello\n" * 50)}), ("image",), "form"),
        Case("form with an unknown model", lambda c: c.form({"model": "NoSuchModel", "colormap": "inferno",
                                                             "outputs": "png"}, {"image": ("a.jpg", jpeg)}),
             ("model", "nosuchmodel"), "form"),
        Case("form with an unknown colormap", lambda c: c.form({"model": "MiDaS_small", "colormap": "rainbow",
                                                                "outputs": "png"}, {"image": ("a.jpg", jpeg)}),
             ("colormap", "colour", "color", "rainbow"), "form"),
        Case("form with a PNG bomb", lambda c: c.form({"model": "MiDaS_small", "colormap": "inferno", "outputs": "png"},
                                                      {"image": ("bomb.png", images.png_bomb())}),
             ("pixel", "image"), "form"),
        Case("form without CSRF token", lambda c: c.form({"model": "MiDaS_small"}, {"image": ("a.jpg", jpeg)},
                                                         csrf=False), ("csrf",), "form"),
    ]


def _text_of(response) -> tuple[int, str]:
    if isinstance(response, tuple):
        return response
    return response.status_code, response.text


def _named(status: int, body: str, words: tuple[str, ...]) -> bool:
    text = body
    try:
        data = json.loads(body)
        text = json.dumps(data)
    except ValueError:
        text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", body, flags=re.S)
        # A form page: only its error lists count (with their id, which says the field), not the form's labels.
        errors = re.findall(r'<ul class="errorlist"[^>]*>.*?</ul>', text, flags=re.S | re.I)
        text = " ".join(errors) if errors else ("csrf" if "csrf" in text.lower() and status == 403 else "")
    lowered = text.lower()
    return any(word.lower() in lowered for word in words)


def bad_requests(workspace: Workspace) -> Result:
    result = Result("bad-requests")
    site = workspace.site("bad-requests", DEPTHSITE_PUBLIC_UPLOADS="1", DEPTHSITE_PUBLIC_STATUS="0",
                          DEPTHSITE_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT), DEPTHSITE_UPLOAD_RATE="100000/hour",
                          DEPTHSITE_WRITE_RATE="100000/hour", DEPTHSITE_OFFLINE="1", DJANGO_DEBUG="0",
                          DJANGO_SECRET_KEY="bench-" + uuid.uuid4().hex)
    made = manage(site, "shell", "-c", USERS, timeout=120)
    if made.returncode != 0:
        raise RuntimeError(f"could not create users: {made.stderr[-500:]}")
    staff, user = made.stdout.split()[-2:]
    port = free_port()
    server = spawn([PYTHON, MANAGE, "runserver", "--noreload", f"127.0.0.1:{port}"], env=site.env(),
                   log=site.root / "web.log")
    client = Client(f"http://127.0.0.1:{port}", staff, user, port)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                requests.get(client.base + "/api/schema/", timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.3)
        chosen = cases()
        if workspace.quick:
            chosen = chosen[::4]
        details = []
        for case in chosen:
            try:
                status, body = _text_of(case.send(client))
            except requests.RequestException as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            details.append({"case": case.name, "area": case.area, "status": status,
                            "named": 400 <= status < 500 and _named(status, body, case.names),
                            "body": body[:240]})
    finally:
        stop(server)
    server_errors = [d for d in details if d["status"] >= 500 or d["status"] == 0]
    not_4xx = [d for d in details if not 400 <= d["status"] < 500]
    unnamed = [d for d in details if 400 <= d["status"] < 500 and not d["named"]]
    result.runs = len(details)
    result.figures = {
        "requests": len(details),
        "5xx": len(server_errors),
        "2xx/3xx (accepted)": sum(1 for d in details if 200 <= d["status"] < 400),
        "4xx naming the problem": sum(d["named"] for d in details),
        "4xx not naming it": len(unnamed),
    }
    result.details = details
    result.expect(not server_errors, "5xx or no answer: " + ", ".join(f"{d['case']} ({d['status']})"
                                                                      for d in server_errors))
    result.expect(not not_4xx or all(d["status"] >= 500 for d in not_4xx),
                  "not refused: " + ", ".join(f"{d['case']} ({d['status']})" for d in not_4xx if d["status"] < 500))
    result.expect(not unnamed, "the answer does not name the problem: " + ", ".join(
        f"{d['case']} ({d['status']})" for d in unnamed))
    return result
