"""The ply output through the doors: the API (fov validated, the file with its content type), the upload form, and
the job page's 3D view drawing the cloud in Chromium from vendored three.js."""
from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.models import DepthJob
from inference.writers import read_ply
from depthsite.testing import images
from tests.jobs.conftest import upload
from tests.support.browser import policy_refusals

pytestmark = pytest.mark.django_db
LIST = "/api/predictions/"


def submit(client, run_jobs, **fields):
    with run_jobs():
        return client.post(LIST, {"image": upload(), **fields}, format="multipart")


def ply_from(response) -> tuple[list[str], np.ndarray]:
    with tempfile.NamedTemporaryFile(suffix=".ply") as handle:
        handle.write(b"".join(response.streaming_content))
        handle.flush()
        return read_ply(Path(handle.name))


def test_the_api_makes_a_point_cloud_with_the_fov_asked_for(api, cached_small, run_jobs):
    body = submit(api, run_jobs, outputs="ply,npy", fov="75").json()
    body = api.get(body["url"]).json()
    assert body["status"] == "succeeded", body["error"]
    assert body["outputs"] == ["npy", "ply"] and body["fov"] == 75
    response = api.get(body["files"]["ply"])
    assert response.status_code == 200 and response["Content-Type"] == "application/x-ply"
    assert 'filename="photo-depth.ply"' in response["Content-Disposition"]
    header, vertices = ply_from(response)
    assert "format binary_little_endian 1.0" in header and vertices.size == 96 * 72
    assert any("horizontal fov 75 degrees" in line for line in header)
    assert any("not metres" in line for line in header)
    depth = np.load(io.BytesIO(b"".join(api.get(body["files"]["npy"]).streaming_content)))
    z = vertices["z"].reshape(depth.shape)
    assert z[np.unravel_index(depth.argmax(), depth.shape)] < z[np.unravel_index(depth.argmin(), depth.shape)]
    with Image.open(io.BytesIO(images.jpeg())) as photo:
        colours = np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1).reshape(72, 96, 3)
        np.testing.assert_array_equal(colours, np.asarray(photo.convert("RGB")))
    # The browser's preview travels beside it.
    preview = api.get(body["files"]["ply_preview"])
    assert preview.status_code == 200 and preview["Content-Type"] == "application/x-ply"


def test_the_default_fov_is_60_degrees(api, cached_small, run_jobs):
    body = submit(api, run_jobs, outputs="ply").json()
    assert body["fov"] == 60
    header, _ = ply_from(api.get(api.get(body["url"]).json()["files"]["ply"]))
    assert any("horizontal fov 60 degrees" in line for line in header)


@pytest.mark.parametrize("fov", ["500", "0", "-10", "wide", "nan"])
def test_a_bad_fov_is_400_naming_it(api, small_model, run_jobs, fov):
    response = submit(api, run_jobs, outputs="ply", fov=fov)
    assert response.status_code == 400, response.content
    assert response.json()["message"].startswith("fov:")
    assert not DepthJob.objects.exists()


def test_the_upload_form_takes_the_fov_and_says_when_it_is_wrong(client, user, cached_small, run_jobs):
    client.force_login(user)
    with run_jobs():
        response = client.post("/", {"image": upload(), "model": "MiDaS_small", "outputs": ["ply"],
                                     "colormap": "inferno", "fov": "5"})
    assert response.status_code == 400
    assert "field of view must be from 10 to 170 degrees" in response.content.decode()
    assert not DepthJob.objects.exists()
    page = client.get("/").content.decode()
    assert 'name="outputs" value="ply"' in page and 'name="fov"' in page

    with run_jobs():
        response = client.post("/", {"image": upload(), "model": "MiDaS_small", "outputs": ["ply"],
                                     "colormap": "inferno", "fov": "90"})
    assert response.status_code == 302
    job = DepthJob.objects.get()
    assert job.fov_degrees == 90 and set(job.result_files) == {"ply", "ply_preview"}
    detail = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="viewer3d"' in detail and f"/jobs/{job.pk}/files/ply_preview" in detail
    assert "vendor/three-0.170.0/three.module.min.js" in detail and "relative depth, not metres" in detail


BACKGROUND = (0x11, 0x14, 0x18)
# Counts the page's requestAnimationFrame calls and the callbacks run (Playwright's own waits run in another world
# and use other timers).
COUNT_FRAMES = """
window.frameRequests = 0;
window.framesRun = 0;
const requestFrame = window.requestAnimationFrame.bind(window);
window.requestAnimationFrame = (callback) => {
  window.frameRequests += 1;
  return requestFrame((time) => { window.framesRun += 1; callback(time); });
};
"""
FRAME_COUNTS = "[window.frameRequests, window.framesRun]"


def wait_until_idle(page, quiet_ms: int = 400, timeout_s: float = 45.0) -> int:
    """Wait until every frame asked for has been drawn and none was asked for in `quiet_ms`; the count asked."""
    deadline = time.monotonic() + timeout_s
    before = page.evaluate(FRAME_COUNTS)
    while True:
        page.wait_for_timeout(quiet_ms)
        now = page.evaluate(FRAME_COUNTS)
        if now == before and now[0] == now[1]:
            return now[0]
        assert time.monotonic() < deadline, f"still drawing after {timeout_s} s: {now[0]} frames asked for"
        before = now


@pytest.mark.browser
@pytest.mark.slow
def test_the_job_page_shows_the_cloud_in_3d(transactional_db, live_server, cached_small, settings, request,
                                            tmp_path):
    from inference.services import jobs as job_services
    from inference.services.job_runs import depth_job_run

    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    with_ply = job_services.depth_job_create(image=upload(images.jpeg(160, 120)), outputs=["png", "ply"])
    depth_job_run(job=DepthJob.objects.get(pk=with_ply.pk))
    without = job_services.depth_job_create(image=upload(images.jpeg(64, 48)), outputs=["png"])
    depth_job_run(job=DepthJob.objects.get(pk=without.pk))

    browser = request.getfixturevalue("browser")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    foreign: list[str] = []
    page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(live_server.url) else None)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    refused = policy_refusals(page)  # the import map runs under the site's policy, by its nonce

    page.add_init_script(COUNT_FRAMES)
    page.goto(f"{live_server.url}/jobs/{with_ply.pk}/")
    page.wait_for_selector('#viewer3d[data-state="ready"]', timeout=30_000)
    assert int(page.get_attribute("#viewer3d", "data-points")) == 160 * 120
    page.wait_for_timeout(500)  # a few frames
    canvas = page.locator("#viewer3d-canvas")
    shot = tmp_path / "canvas.png"
    canvas.screenshot(path=str(shot))
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    drawn = np.abs(pixels.astype(int) - BACKGROUND).sum(axis=1) > 30
    assert drawn.mean() > 0.05, f"only {drawn.mean():.1%} of the canvas is drawn"
    assert len({tuple(p) for p in pixels[drawn][::7]}) > 50  # the photo's colours, not one flat blob

    # Rotating changes what is drawn (the controls are live).
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 200, box["y"] + box["height"] / 2 + 40, steps=8)
    page.mouse.up()
    page.wait_for_timeout(500)
    with Image.open(io.BytesIO(canvas.screenshot())) as rotated:
        assert not np.array_equal(np.asarray(rotated.convert("RGB")).reshape(-1, 3), pixels)
    # Once the damping has settled, a page nobody touches asks for no more frames; a resize draws again.
    asked = wait_until_idle(page)
    page.wait_for_timeout(1000)
    assert page.evaluate("window.frameRequests") == asked
    page.set_viewport_size({"width": 900, "height": 700})
    page.wait_for_function("(asked) => window.frameRequests > asked", arg=asked, polling=100, timeout=5_000)
    assert foreign == [] and errors == [] and refused == []
    # The .ply is a download; the preview is the view's own file, not offered as one.
    assert page.locator('#downloads a[data-format="ply"]').count() == 1
    assert page.locator('#downloads a[data-format="ply_preview"]').count() == 0

    page.goto(f"{live_server.url}/jobs/{without.pk}/")
    assert page.is_hidden("#viewer3d")
    page.close()


@pytest.mark.slow
def test_a_result_is_reused_only_for_the_same_field_of_view(api, cached_small, run_jobs, settings):
    settings.DEPTHSITE_REUSE_RESULTS = True
    first = api.get(submit(api, run_jobs, outputs="ply", fov="60").json()["url"]).json()
    same = api.get(submit(api, run_jobs, outputs="ply", fov="60").json()["url"]).json()
    wider = api.get(submit(api, run_jobs, outputs="ply", fov="90").json()["url"]).json()
    assert same["reused_from"] == first["id"]
    assert wider["status"] == "succeeded" and wider["reused_from"] is None
    header, _ = ply_from(api.get(wider["files"]["ply"]))
    assert any("horizontal fov 90 degrees" in line for line in header)
