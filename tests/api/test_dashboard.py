"""The /models/ dashboard: who sees it, what it shows, its server-drawn chart, and (in Chromium) a live verify."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model

from models_registry import cachefs
from depthsite.choices import RunStatus
from models_registry.choices import Health
from models_registry.models import WarmModel, WeightDownload, WeightFile
from models_registry.services.catalogue import model_pin
from tests.support.operators import grant_operator_permissions

pytestmark = pytest.mark.django_db


def login(client, *, staff: bool):
    user = get_user_model().objects.create_user("staff" if staff else "viewer", password="pw-123-dash",
                                                is_staff=staff)
    if staff:
        grant_operator_permissions(user)  # a cache operator: the buttons follow the model permissions
    client.force_login(user)
    return client


def row_of(html: str, model: str) -> str:
    match = re.search(rf'<tr data-model="{model}".*?</tr>', html, re.S)
    assert match, f"no row for {model}"
    return match.group(0)


def test_anonymous_visitors_are_sent_to_log_in(client):
    response = client.get("/models/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/?next=/models/"
    assert client.get("/models/chart.svg").status_code == 403


def test_public_status_shows_the_page_without_actions(client, settings, cached_record):
    settings.DEPTHSITE_PUBLIC_STATUS = True
    response = client.get("/models/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-model="MiDaS_small"' in html and "data-action" not in html
    assert client.get("/models/chart.svg").status_code == 200


def test_the_page_shows_files_health_pin_progress_and_warm_workers(client, cached_record, small_model):
    WeightFile.objects.create(model=small_model, format="h5", path="MiDaS_small/midas_v21_small_256.h5",
                              size=40_000_000, sha256="2" * 64, node="test-node", health=Health.CORRUPT,
                              health_reason="midas_v21_small_256.h5 has 10 bytes but 40000000 were recorded")
    # Pinning the cached file's own hash keeps it served (a different pin would stop serving it).
    model_pin(model=small_model, sha256=cached_record.sha256)
    WeightDownload.objects.create(model=small_model, node="test-node", status=RunStatus.RUNNING,
                                  bytes_done=30_000_000, bytes_total=100_000_000)
    WarmModel.objects.create(model=small_model, worker="web-1:4242", node="test-node", device="cpu",
                             dtype="float32")
    response = login(client, staff=False).get("/models/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="total-files">2<' in html and 'id="total-bytes">125.7 MB<' in html
    assert 'id="cache-health" class="bad">1 file(s) need attention<' in html
    row = row_of(html, "MiDaS_small")
    assert '<span class="badge ok">ok</span>' in row and '<span class="badge corrupt">corrupt</span>' in row
    assert "has 10 bytes but 40000000 were recorded" in row and "last used never" in row
    assert "85.7 MB" in row and "40.0 MB" in row
    assert 'title="' + cached_record.sha256 + '">' + cached_record.sha256[:16] + "…" in row
    assert '<span class="badge running">running</span>' in row and 'style="width: 30.0%"' in row
    assert "30.0 MB of 100.0 MB" in row and "web-1:4242" in row and "cpu/float32" in row
    assert "data-action" not in html  # not staff: no buttons


def test_staff_see_the_actions_and_get_a_csrf_cookie(client, small_model):
    response = login(client, staff=True).get("/models/")
    html = response.content.decode()
    row = row_of(html, "MiDaS_small")
    for action in ("download", "verify", "convert", "export", "clear"):
        assert f'data-action="{action}"' in row
    assert 'data-verify-url="/api/models/MiDaS_small/verify"' in row
    assert 'href="/api/models/MiDaS_small/export?format=pt"' in row
    assert response.cookies["csrftoken"].value
    # Local assets only: the page's scripts and styles come from this site.
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
    assert "/static/depthsite/dashboard.js" in assets and "/static/depthsite/dashboard.css" in assets
    assert not [url for url in assets if url.startswith(("http:", "https:", "//"))]


def test_chart_stacks_formats_in_proportion(client, cached_record, small_model):
    WeightFile.objects.create(model=small_model, format="h5", path="MiDaS_small/x.h5", size=cached_record.size // 2,
                              sha256="3" * 64, node="test-node")
    response = login(client, staff=False).get("/models/chart.svg")
    assert response.status_code == 200 and response["Content-Type"] == "image/svg+xml"
    svg = response.content.decode()
    assert svg.startswith("<svg") and "MiDaS_small [pt]: 85.7 MB (ok)" in svg
    widths = dict(re.findall(r'data-format="(\w+)" x="[\d.]+" y="\d+" width="([\d.]+)"', svg))
    assert float(widths["pt"]) == pytest.approx(2 * float(widths["h5"]), rel=0.01)
    assert float(widths["pt"]) + float(widths["h5"]) == pytest.approx(500, rel=0.01)  # the largest fills the bar


# --- in a browser --------------------------------------------------------------------------------


@pytest.fixture
def staff_page(live_server, client, monkeypatch, request):
    """Chromium (the shared `browser` fixture) with a staff session, and the list of requests that left the
    live server."""
    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    login(client, staff=True)
    session = client.cookies["sessionid"].value
    browser = request.getfixturevalue("browser")
    context = browser.new_context()
    context.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
    page = context.new_page()
    page.set_default_timeout(20_000)
    foreign: list[str] = []
    host = urlsplit(live_server.url).netloc
    page.on("request", lambda request: foreign.append(request.url)
            if urlsplit(request.url).netloc not in (host, "") else None)
    page.foreign_requests = foreign
    yield page
    context.close()


@pytest.mark.browser
@pytest.mark.slow
def test_staff_verify_in_the_browser_turns_the_badge_corrupt(staff_page, live_server, cached_record):
    from playwright.sync_api import expect

    # Damaged behind the registry's back: the record still says ok until someone verifies.
    path = cachefs.absolute(cached_record.path)
    path.write_bytes(path.read_bytes()[: cached_record.size // 2])

    page = staff_page
    page.goto(f"{live_server.url}/models/")
    row = page.locator('tr[data-model="MiDaS_small"]')
    badge = row.locator('.wf[data-format="pt"] .badge')
    expect(badge).to_have_text("ok")

    row.get_by_role("button", name="Verify").click()

    expect(row.locator(".result")).to_contain_text("MiDaS_small [pt]: corrupt", timeout=30_000)
    expect(row.locator(".result")).to_have_class(re.compile(r"\berror\b"))  # shown as a problem, not in green
    expect(badge).to_have_text("corrupt", timeout=15_000)
    expect(badge).to_have_class(re.compile(r"\bcorrupt\b"))
    expect(row.locator('.wf[data-format="pt"] .reason')).to_contain_text("truncated")
    expect(page.locator("#cache-health")).to_have_text("1 file(s) need attention")
    # The server redraws the chart once the status it shows has changed.
    expect(page.locator('#cache-chart rect.segment[data-format="pt"] title')).to_contain_text("(corrupt)")
    assert page.foreign_requests == []

    cached_record.refresh_from_db()
    assert cached_record.health == Health.CORRUPT and "truncated" in cached_record.health_reason


@pytest.mark.browser
@pytest.mark.slow
def test_swagger_ui_renders_from_local_assets(staff_page, live_server):
    from playwright.sync_api import expect

    staff_page.goto(f"{live_server.url}/api/docs/")
    expect(staff_page.locator(".swagger-ui .info .title")).to_contain_text("depthsite API")
    expect(staff_page.locator("#operations-models-models_status")).to_be_visible()
    assert staff_page.foreign_requests == []
