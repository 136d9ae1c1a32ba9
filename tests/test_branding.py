"""What every page wears: a favicon that is an image (no 404 on each page), the admin's own name, and admin
change lists that fit a laptop screen."""
from __future__ import annotations

import urllib.request

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

pytestmark = pytest.mark.django_db
BRAND = "depthsite administration"


def fetch(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:  # follows the redirect from /favicon.ico
        return response.status, response.headers.get_content_type(), response.read()


def test_the_favicon_is_an_image_and_every_page_links_it(live_server, client):
    status, content_type, body = fetch(f"{live_server.url}/favicon.ico")
    assert status == 200 and content_type in ("image/x-icon", "image/vnd.microsoft.icon")
    assert body[:4] == b"\x00\x00\x01\x00"  # an ICO directory
    page = client.get("/accounts/login/").content.decode()
    assert 'rel="icon"' in page and "depthsite/favicon.png" in page
    status, content_type, body = fetch(f"{live_server.url}/static/depthsite/favicon.png")
    assert status == 200 and content_type == "image/png" and body.startswith(b"\x89PNG")


def test_the_admin_wears_the_brand(client):
    staff = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123")
    login = client.get("/admin/login/").content.decode()
    assert f"<title>Log in | {BRAND}</title>" in login and BRAND in login and "Django administration" not in login
    client.force_login(staff)
    index = client.get("/admin/").content.decode()
    assert BRAND in index and "Django administration" not in index and "Site administration" not in index
    assert "depthsite/favicon.png" in index and "depthsite/admin.css" in index
    changelist = client.get("/admin/inference/depthjob/").content.decode()
    assert f"| {BRAND}</title>" in changelist


CHANGELISTS = ["/admin/models_registry/registeredmodel/", "/admin/models_registry/weightfile/",
               "/admin/models_registry/weightdownload/", "/admin/inference/depthjob/"]
LONG = ("the file ends before its central directory: truncated while downloading or copying; "
        "/var/cache/depthsite/models/MiDaS_small/midas_v21_small_256-0123456789abcdef0123456789abcdef.pt ") * 3


WIDTHS = """() => {
  const box = document.querySelector('#changelist-form .results');
  return {document: document.documentElement.scrollWidth, body: document.body.scrollWidth,
          viewport: window.innerWidth, table: box.scrollWidth, box: box.clientWidth};
}"""


@pytest.mark.browser
@pytest.mark.slow
def test_admin_change_lists_fit_a_laptop_viewport(transactional_db, live_server, client, small_model, request):
    from inference.models import DepthJob
    from models_registry.models import WeightDownload, WeightFile

    # Rows with the long texts that widen tables: health reasons, download errors, job errors.
    for fmt in ("pt", "h5", "safetensors", "pkl"):
        WeightFile.objects.create(model=small_model, format=fmt, path=f"MiDaS_small/{'x' * 90}.{fmt}", size=85_000_000,
                                  sha256="ab" * 32, content_digest="cd" * 32, dtype="float32", health="corrupt",
                                  health_reason=LONG, node="a-rather-long-worker-node-name.example.internal",
                                  last_used_at=timezone.now(), verified_at=timezone.now())
    WeightDownload.objects.create(model=small_model, node="a-rather-long-worker-node-name.example.internal",
                                  status="failed", error=LONG)
    for _ in range(3):
        DepthJob.objects.create(image="uploads/x.jpg", image_name="x" * 120, image_sha256="0" * 64, image_size=1,
                                model=small_model, model_name="MiDaS_small", outputs=["png"], colormap="inferno",
                                status="failed", error=LONG)
    staff = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(staff)
    session = client.cookies["sessionid"].value

    browser = request.getfixturevalue("browser")
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    context.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
    page = context.new_page()
    for path in CHANGELISTS:
        page.goto(live_server.url + path)
        assert BRAND in page.inner_text("#site-name")
        widths = page.evaluate(WIDTHS)
        assert widths["document"] <= widths["viewport"] and widths["body"] <= widths["viewport"], (path, widths)
        # Every column visible: the table needs no scrolling inside its box either.
        assert widths["table"] <= widths["box"] + 1, (path, widths)
    context.close()
