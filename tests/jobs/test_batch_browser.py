"""A real browser on the batch pages: pick several photos, land on the batch page, watch it fill in as jobs finish.

As in test_browser.py: Playwright's event loop owns the test thread, so ORM work runs in a thread of its own."""
from __future__ import annotations

import pytest

from inference.models import DepthBatch, DepthJob
from depthsite.testing import images
from tests.jobs.test_browser import off_the_loop

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DEPTH_THUMBS = """() => Array.from(document.querySelectorAll('#batch-jobs td.thumb.depth img'))
  .filter(img => img.complete && img.naturalWidth > 0).length"""


def test_a_batch_uploaded_in_the_browser_shows_its_progress_in_place(transactional_db, live_server, cached_small,
                                                                      settings, monkeypatch, tmp_path, request):
    from inference.services import jobs as job_services
    from inference.services.job_runs import depth_job_run

    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    monkeypatch.setattr(job_services, "depth_job_enqueue", lambda job_id: None)  # queued until we run them
    paths = []
    for name, data in (("lake.jpg", images.jpeg(160, 120)), ("hill.png", images.png(120, 90))):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    browser = request.getfixturevalue("browser")
    page = browser.new_page(accept_downloads=True)
    page.goto(live_server.url + "/batch/")
    page.set_input_files("#id_images", [str(path) for path in paths])
    page.click("#submit-batch")
    page.wait_for_url("**/batch/*/", timeout=60_000)
    assert page.inner_text("#batch-progress-text") == "0 of 2 done"
    assert page.locator("#batch-jobs tbody tr").count() == 2
    page.evaluate("() => { window.notReloaded = true; }")

    def run_all():
        for job in DepthJob.objects.filter(batch__isnull=False):
            depth_job_run(job=job)
        return DepthBatch.objects.get().pk

    batch_id = off_the_loop(run_all)
    page.wait_for_function("() => document.getElementById('batch-progress-text').textContent === '2 of 2 done'",
                           timeout=30_000)
    page.wait_for_function(f"() => ({DEPTH_THUMBS})() === 2", timeout=30_000)
    assert page.evaluate("() => window.notReloaded === true")  # updated in place
    assert page.inner_text("#batch-archive") == "Download all outputs (zip)"
    with page.expect_download() as download_info:
        page.click("#batch-archive")
    assert download_info.value.suggested_filename == f"depth-batch-{batch_id.hex[:8]}.zip"
    page.close()
