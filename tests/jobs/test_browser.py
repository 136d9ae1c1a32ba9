"""A real browser (Playwright driving Debian's Chromium) on the pages: log in, upload, see and download the depth.

The browser is the shared `browser` fixture (tests/conftest.py: skips with one reason without Chromium).
The server is pytest-django's live_server (in-process thread); with Q_CLUSTER sync the job runs while the
upload request is handled. The second test keeps a job queued so the page's live status is what updates it.
Playwright's sync API runs an event loop in the test thread, where Django refuses ORM calls: the tests
touch the database before the browser starts, after it stops, or from another thread.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from inference.models import DepthJob
from depthsite.testing import images

pytestmark = [pytest.mark.browser, pytest.mark.slow]
def off_the_loop(function):
    """Run ORM work in a thread of its own: the browser's event loop owns the test thread."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # re-raised in the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def photo_file(tmp_path) -> Path:
    path = tmp_path / "garden.jpg"
    path.write_bytes(images.jpeg(320, 240))
    return path


RENDERED = """() => {
  const img = document.getElementById('depth-image');
  return img && img.complete && img.naturalWidth > 0;
}"""
DISTINCT_COLOURS = """() => {
  const img = document.getElementById('depth-image');
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  for (let i = 0; i < data.length; i += 4 * 7) colours.add(data[i] << 16 | data[i + 1] << 8 | data[i + 2]);
  return {width: img.naturalWidth, height: img.naturalHeight, colours: colours.size};
}"""


def test_upload_a_photo_and_download_its_depth_map(transactional_db, live_server, cached_small, django_user_model,
                                                   photo_file, request):
    django_user_model.objects.create_user("carol", password="pw-carol-12345")
    browser = request.getfixturevalue("browser")
    page = browser.new_page(accept_downloads=True)
    page.goto(live_server.url + "/")
    assert "/accounts/login/" in page.url  # uploads are not public in the test settings
    page.fill("#id_username", "carol")
    page.fill("#id_password", "pw-carol-12345")
    page.click("button[type=submit]")
    page.wait_for_url(live_server.url + "/")

    page.set_input_files("#id_image", str(photo_file))
    page.check('input[name=model][value="MiDaS_small"]')
    page.check('input[name=outputs][value="npy"]')
    page.select_option("select[name=colormap]", "viridis")
    page.click("#submit-upload")
    page.wait_for_url("**/jobs/*/", timeout=60_000)
    page.wait_for_function(RENDERED, timeout=60_000)
    assert page.inner_text("#job-status") == "succeeded"
    shown = page.evaluate(DISTINCT_COLOURS)
    assert (shown["width"], shown["height"]) == (320, 240) and shown["colours"] > 20  # a real depth render

    page.locator("#compare-slider").fill("20")
    assert "80%" in page.eval_on_selector("#compare-after", "element => element.style.clipPath")

    link = page.locator('#downloads a[data-format="png"]')
    fetched = page.request.get(live_server.url + link.get_attribute("href"))
    assert fetched.status == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.body().startswith(b"\x89PNG")
    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    assert download.suggested_filename == "garden-depth.png"
    assert Path(download.path()).read_bytes() == fetched.body()
    npy = page.request.get(live_server.url + page.locator('#downloads a[data-format="npy"]').get_attribute("href"))
    assert npy.status == 200 and npy.body().startswith(b"\x93NUMPY")
    job_id = page.url.rstrip("/").rsplit("/", 1)[1]
    page.close()

    job = off_the_loop(lambda: DepthJob.objects.select_related("owner").get(pk=job_id))
    assert job.status == "succeeded" and job.owner.username == "carol" and job.colormap == "viridis"


def test_the_job_page_updates_in_place_when_the_job_finishes(transactional_db, live_server, cached_small, settings,
                                                            monkeypatch, request):
    from inference.services import jobs as job_services
    from inference.services.job_runs import depth_job_run
    from tests.jobs.conftest import upload

    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    monkeypatch.setattr(job_services, "depth_job_enqueue", lambda job_id: None)  # stays queued until we run it
    job = job_services.depth_job_create(image=upload(images.jpeg(160, 120)))
    browser = request.getfixturevalue("browser")
    page = browser.new_page()
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    assert page.inner_text("#job-status") == "queued" and page.is_hidden("#job-result")
    page.evaluate("() => { window.notReloaded = true; }")

    # The worker's part.
    off_the_loop(lambda: depth_job_run(job=DepthJob.objects.get(pk=job.pk)))
    page.wait_for_function(RENDERED, timeout=30_000)
    assert page.inner_text("#job-status") == "succeeded" and page.is_visible("#job-result")
    assert page.evaluate("() => window.notReloaded === true")  # updated in place, not reloaded
    assert page.locator("#downloads a").count() == 1 and page.inner_text("#downloads a") == "colour PNG"
    assert page.inner_text('[data-field="inference_ms"]').endswith(" ms")
    page.close()
