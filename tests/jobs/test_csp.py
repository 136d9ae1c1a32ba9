"""The Content-Security-Policy (depthsite.csp): every page runs only the site's own scripts, and nothing else a
user can open in a tab runs anything at all."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse

from depthsite.csp import CLOSED, HEADER
from inference.models import DepthJob
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db

TEMPLATES = Path(settings.BASE_DIR) / "templates"
SCRIPT_TAG = re.compile(r"<script\b([^>]*)>", re.IGNORECASE)
# Types a browser treats as data, never runs (and so never checks against script-src).
DATA_TYPES = {"application/json", "application/ld+json", "text/template"}
# An attribute that runs code: onclick=, onload=, ... (not data-on-... or a word in text).
HANDLER = re.compile(r"<[a-z][^>]*\son[a-z]+\s*=", re.IGNORECASE)


def directives(policy: str) -> dict[str, list[str]]:
    parts = (part.split() for part in policy.split(";") if part.strip())
    return {words[0]: words[1:] for words in parts}


def attribute(attributes: str, name: str) -> str | None:
    found = re.search(rf"""\b{name}\s*=\s*["']([^"']*)["']""", attributes, re.IGNORECASE)
    return found.group(1) if found else None


def inline_scripts_without(html: str, nonce: str | None) -> list[str]:
    """Every <script> in `html` that has no src, is not a data block, and does not carry `nonce`."""
    refused = []
    for match in SCRIPT_TAG.finditer(html):
        attributes = match.group(1)
        if attribute(attributes, "src") is not None:
            continue
        if (attribute(attributes, "type") or "").lower() in DATA_TYPES:
            continue
        if nonce is None or attribute(attributes, "nonce") != nonce:
            refused.append(match.group(0))
    return refused


def page_nonce(response) -> str:
    policy = directives(response[HEADER])
    nonces = [word for word in policy["script-src"] if word.startswith("'nonce-")]
    assert len(nonces) == 1, response[HEADER]
    return nonces[0].removeprefix("'nonce-").removesuffix("'")


def assert_page_policy(response) -> str:
    """The page's policy holds scripts to the site's own and one nonce; that nonce."""
    assert response["Content-Type"].startswith("text/html")
    policy = directives(response[HEADER])
    assert policy["script-src"][0] == "'self'" and len(policy["script-src"]) == 2
    assert not {"'unsafe-inline'", "'unsafe-eval'", "*", "data:", "https:"} & set(policy["script-src"])
    assert policy["default-src"] == ["'self'"] and policy["object-src"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]
    assert policy["form-action"] == ["'self'"] and policy["connect-src"] == ["'self'"]
    nonce = page_nonce(response)
    html = response.content.decode()
    assert inline_scripts_without(html, nonce) == []
    assert not HANDLER.search(html) and "javascript:" not in html.lower()
    return nonce


@pytest.fixture
def finished_with_ply(client, user, cached_small, run_jobs):
    from inference.services import jobs as job_services
    from depthsite.testing import images

    with run_jobs():
        job = job_services.depth_job_create(image=upload(images.jpeg(64, 48)), outputs=["png", "ply"], owner=user)
    job = DepthJob.objects.get(pk=job.pk)
    assert job.status == "succeeded", job.error
    return job


def test_every_page_holds_scripts_to_the_site_and_a_fresh_nonce(client, user, staff, finished_with_ply):
    client.force_login(user)
    job_page = client.get(reverse("inference:job_detail", args=[finished_with_ply.pk]))
    nonce = assert_page_policy(job_page)
    # The import map of the 3D viewer is the one inline script; it carries this response's nonce.
    assert re.search(rf'<script type="importmap" nonce="{re.escape(nonce)}">', job_page.content.decode())
    again = client.get(reverse("inference:job_detail", args=[finished_with_ply.pk]))
    assert page_nonce(again) != nonce and len(nonce) >= 22
    for url in ("/", "/jobs/", "/batch/", "/api/docs/", "/accounts/password_change/"):
        response = client.get(url)
        assert response.status_code == 200, url
        assert_page_policy(response)
    client.logout()
    for url in ("/accounts/login/", "/admin/login/"):
        assert_page_policy(client.get(url))
    client.force_login(staff)
    for url in ("/admin/", "/admin/inference/depthjob/", f"/admin/inference/depthjob/{finished_with_ply.pk}/change/",
                reverse("models_registry:dashboard")):
        response = client.get(url)
        assert response.status_code == 200, url
        assert_page_policy(response)


def test_what_is_not_a_page_is_closed(client, user, finished_with_ply):
    client.force_login(user)
    for url in (reverse("inference:job_file", args=[finished_with_ply.pk, "png"]),
                reverse("inference:job_file", args=[finished_with_ply.pk, "ply"]),
                reverse("inference:job_input", args=[finished_with_ply.pk]),
                reverse("inference:job_status", args=[finished_with_ply.pk]),
                "/api/models/", "/api/docs/?script="):
        response = client.get(url)
        assert response.status_code == 200, url
        assert not response["Content-Type"].startswith("text/html"), url
        assert response[HEADER] == CLOSED, url
    assert "sandbox" in directives(CLOSED) and directives(CLOSED)["default-src"] == ["'none'"]
    # An error page is a page too; an API error is JSON.
    missing = client.get("/jobs/00000000-0000-0000-0000-000000000000/")
    assert missing.status_code == 404 and directives(missing[HEADER])["script-src"][0] == "'self'"
    assert client.get("/api/predictions/00000000-0000-0000-0000-000000000000/")[HEADER] == CLOSED


def test_no_template_writes_a_script_the_policy_would_refuse():
    """Inline scripts need the request's nonce, and no markup may carry an event handler or a javascript: URL:
    a template that did would break under the policy, in the browser only."""
    found = {}
    for path in sorted(TEMPLATES.rglob("*.html")):
        text = path.read_text()
        bad = [tag for tag in inline_scripts_without(text, "{{ request.csp_nonce }}")]
        if HANDLER.search(text) or "javascript:" in text.lower():
            bad.append("an event handler attribute or javascript: URL")
        if bad:
            found[str(path.relative_to(TEMPLATES))] = bad
    assert found == {}


@pytest.mark.browser
@pytest.mark.slow
def test_in_the_browser_the_pages_run_under_the_policy(transactional_db, live_server, staff, request):
    """Swagger UI (its start-up script served apart), the dashboard and the admin run with nothing refused."""
    from tests.support.browser import policy_refusals

    browser = request.getfixturevalue("browser")
    context = browser.new_context()
    page = context.new_page()
    refused = policy_refusals(page)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "pw-admin-123")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")
    page.goto(f"{live_server.url}/api/docs/")
    # The operations are listed only once the start-up script has run and fetched the schema.
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    assert page.locator(".opblock").count() > 10
    page.goto(f"{live_server.url}{reverse('models_registry:dashboard')}")
    page.wait_for_load_state("networkidle")
    page.goto(f"{live_server.url}/admin/inference/depthjob/")
    page.wait_for_load_state("networkidle")
    assert refused == [] and errors == []
    # The check can fail: an inline script without the nonce is refused and reported.
    page.set_content("<script>window.ran = 1</script>")  # about:blank has no policy: runs
    page.goto(f"{live_server.url}/admin/")
    page.evaluate("""() => { const s = document.createElement('script'); s.textContent = 'window.ran = 2';
                             document.body.appendChild(s); }""")
    assert page.evaluate("window.ran") is None and any("inline script" in text for text in refused)
    context.close()
