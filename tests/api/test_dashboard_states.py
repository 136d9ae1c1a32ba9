"""The dashboard shows the current state only: one line per problem (the whole text behind a toggle), no failed
download that a later healthy file has superseded, and only live workers (quiet ones as gone, dead ones not)."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from models_registry.api.public import ERROR_HIDDEN
from depthsite.choices import RunStatus
from models_registry.models import WarmModel, WeightDownload
from tests.api.test_dashboard import login, row_of, staff_page  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db

TRACEBACK = "download of MiDaS_small failed: HTTPSConnectionPool(host='github.com', port=443)\n" + "\n".join(
    f"  frame {i}: urllib3/connectionpool.py line {i}" for i in range(40))


def _failed_download(model, *, ago: timedelta) -> WeightDownload:
    download = WeightDownload.objects.create(model=model, node="test-node", status=RunStatus.FAILED,
                                             error=TRACEBACK)
    when = timezone.now() - ago
    WeightDownload.objects.filter(pk=download.pk).update(created_at=when, finished_at=when)
    return download


def test_a_long_error_is_one_line_with_the_whole_text_behind_a_toggle(client, small_model):
    _failed_download(small_model, ago=timedelta(minutes=1))
    row = row_of(login(client, staff=True).get("/models/").content.decode(), "MiDaS_small")
    summary = re.search(r'<details class="reason"><summary>(.*?)</summary><pre>(.*?)</pre></details>', row, re.S)
    assert summary, row
    assert "\n" not in summary.group(1) and len(summary.group(1)) <= 120
    assert summary.group(1).startswith("download of MiDaS_small failed")
    assert "frame 39" in summary.group(2) and "frame 39" not in summary.group(1)


def test_anonymous_readers_still_get_the_fixed_sentence(client, settings, small_model):
    settings.DEPTHSITE_PUBLIC_STATUS = True
    _failed_download(small_model, ago=timedelta(minutes=1))
    row = row_of(client.get("/models/").content.decode(), "MiDaS_small")
    assert f"<summary>{ERROR_HIDDEN}</summary>" in row and "HTTPSConnectionPool" not in row


def test_a_failed_download_before_a_healthy_file_is_not_shown_as_current(client, cached_record, small_model):
    _failed_download(small_model, ago=timedelta(days=1))  # the cached file was written after it
    status = login(client, staff=True).get("/api/models/status").json()
    entry = next(m for m in status["models"] if m["name"] == "MiDaS_small")
    assert entry["download"] is None and entry["health"] == "ok"
    assert "failed" not in row_of(client.get("/models/").content.decode(), "MiDaS_small")


def test_a_failed_download_after_the_file_is_still_shown(client, cached_record, small_model):
    download = _failed_download(small_model, ago=timedelta(days=-1))  # later than the file (and its verify)
    status = login(client, staff=True).get("/api/models/status").json()
    entry = next(m for m in status["models"] if m["name"] == "MiDaS_small")
    assert entry["download"]["id"] == download.pk and entry["download"]["status"] == "failed"


def test_only_live_workers_are_listed_and_quiet_ones_are_marked_gone(client, small_model):
    now = timezone.now()
    for worker, ago in (("live:1", timedelta(seconds=10)), ("quiet:2", timedelta(minutes=5)),
                        ("dead:3", timedelta(hours=1))):
        WarmModel.objects.create(model=small_model, worker=worker, node="test-node", device="cpu", dtype="float32",
                                 last_used_at=now - ago)
    row = row_of(login(client, staff=True).get("/models/").content.decode(), "MiDaS_small")
    assert "live:1" in row and "quiet:2" in row and "dead:3" not in row
    live = re.search(r'<div class="mono small">live:1 .*?</div>', row, re.S).group(0)
    quiet = re.search(r'<div class="mono small gone">quiet:2 .*?</div>', row, re.S).group(0)
    assert "gone" not in live and '<span class="badge gone"' in quiet
    models = client.get("/api/models/status").json()["models"]
    warm = {w["worker"]: w["alive"] for w in next(m for m in models if m["name"] == "MiDaS_small")["warm"]}
    assert warm == {"live:1": True, "quiet:2": False}


@pytest.mark.browser
@pytest.mark.slow
def test_in_the_browser_a_long_error_is_one_line_until_opened(staff_page, live_server, small_model):
    from playwright.sync_api import expect

    _failed_download(small_model, ago=timedelta(minutes=1))
    page = staff_page
    page.goto(f"{live_server.url}/models/")
    cell = page.locator('tr[data-model="MiDaS_small"] td.download')
    details = cell.locator("details.reason")
    expect(details.locator("summary")).to_have_text(re.compile(r"^download of MiDaS_small failed"))
    # The poll redraws the cell with the same toggle (dashboard.js), still one line tall.
    page.wait_for_timeout(5_000)
    closed = details.bounding_box()["height"]
    assert closed < 40, closed
    expect(details.locator("pre")).to_be_hidden()
    details.locator("summary").click()
    expect(details.locator("pre")).to_contain_text("frame 39")
    assert details.bounding_box()["height"] > 5 * closed
