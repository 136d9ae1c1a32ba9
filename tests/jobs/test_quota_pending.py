"""The anonymous byte quota counts what unfinished jobs will write: a small file of many pixels asking for every
output is refused at admission, not discovered once its gigabytes are on disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from PIL import Image
from rest_framework.test import APIClient

from depthsite.choices import RunStatus
from depthsite.testing import images
from inference.exceptions import QuotaExceededError
from inference.models import DepthJob
from inference.services.jobs import depth_job_create, results_bytes_bound
from inference.writers import OUTPUT_FORMATS, PLY_PREVIEW, write_outputs
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
LIST = "/api/predictions/"
QUOTA = 500 * 1000**2


def solid_png(width: int, height: int) -> bytes:
    """Many pixels in few bytes: one colour compresses to almost nothing, but every output is full size."""
    return images.encode(Image.new("RGB", (width, height), (40, 90, 200)), "PNG")


def stored_uploads() -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / "uploads"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


@pytest.fixture
def anonymous(settings) -> APIClient:
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.DEPTHSITE_ANON_MAX_BYTES = QUOTA
    return APIClient()


def test_a_small_file_of_many_pixels_asking_for_every_output_is_refused(anonymous, small_model,
                                                                        django_capture_on_commit_callbacks):
    data = solid_png(5000, 5000)  # 25 MP: its .ply alone is 375 MB, everything about 800 MB
    assert len(data) < 1_000_000
    with django_capture_on_commit_callbacks(execute=False):
        refused = anonymous.post(LIST, {"image": upload(data, "flat.png", "image/png"), "outputs": "all"},
                                 format="multipart")
    assert refused.status_code == 429, refused.content
    body = refused.json()
    assert body["extra"]["kind"] == "quota_bytes" and body["extra"]["limit"] == QUOTA
    assert "anonymous quota reached" in body["message"] and "DEPTHSITE_ANON_MAX_BYTES" in body["message"]
    assert not DepthJob.objects.exists() and stored_uploads() == []

    with django_capture_on_commit_callbacks(execute=False):
        small = anonymous.post(LIST, {"image": upload(), "outputs": "all"}, format="multipart")
    assert small.status_code == 202, small.content


def test_queued_jobs_count_at_what_they_will_write_and_finished_ones_at_what_they_wrote(
        anonymous, small_model, django_capture_on_commit_callbacks):
    data = solid_png(3000, 3000)  # about 290 MB of outputs: one fits in the quota, two do not
    client = {"session_key": "s1", "client_address": "203.0.113.7"}
    with django_capture_on_commit_callbacks(execute=False):
        first = depth_job_create(image=upload(data, "a.png", "image/png"), outputs="all", **client)
        with pytest.raises(QuotaExceededError) as caught:
            depth_job_create(image=upload(data, "b.png", "image/png"), outputs="all", **client)
    assert caught.value.extra["kind"] == "quota_bytes"
    assert caught.value.extra["used"] >= results_bytes_bound(outputs=first.outputs, width=3000, height=3000,
                                                             image_format="PNG")
    assert DepthJob.objects.count() == 1 and len(stored_uploads()) == 1

    # Once it has finished, the first job counts at the bytes it really stored.
    DepthJob.objects.filter(pk=first.pk).update(status=RunStatus.SUCCEEDED, results_bytes=5_000_000)
    with django_capture_on_commit_callbacks(execute=False):
        depth_job_create(image=upload(data, "b.png", "image/png"), outputs="all", **client)
    assert DepthJob.objects.count() == 2


def test_a_batch_is_refused_for_what_its_photos_will_write(anonymous, small_model,
                                                          django_capture_on_commit_callbacks):
    data = solid_png(3000, 3000)
    with django_capture_on_commit_callbacks(execute=False):
        refused = anonymous.post("/api/predictions/batch", {
            "images": [upload(data, f"{n}.png", "image/png") for n in range(2)], "outputs": "all"},
            format="multipart")
    assert refused.status_code == 429, refused.content
    assert refused.json()["extra"]["kind"] == "quota_bytes"
    assert not DepthJob.objects.exists() and stored_uploads() == []


def test_the_bound_holds_for_what_the_writers_write(tmp_path):
    # Noise compresses to nothing less than its raw size: the worst case of every PNG output.
    width, height = 161, 97
    rng = np.random.default_rng(7)
    depth = rng.random((height, width), dtype=np.float32)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    written = write_outputs(depth=depth, image_rgb=rgb, folder=tmp_path, stem="depth", formats=OUTPUT_FORMATS,
                            previews=True)
    for fmt in OUTPUT_FORMATS:
        size = written[fmt].stat().st_size + (written[PLY_PREVIEW].stat().st_size if fmt == "ply" else 0)
        bound = results_bytes_bound(outputs=[fmt], width=width, height=height, image_format="JPEG")
        assert size <= bound, fmt
        assert bound <= 1.05 * size + 16_384, fmt  # an upper bound, not a guess far above it
    assert results_bytes_bound(outputs=list(OUTPUT_FORMATS), width=width, height=height, image_format="JPEG") == sum(
        results_bytes_bound(outputs=[fmt], width=width, height=height, image_format="JPEG") for fmt in OUTPUT_FORMATS)


def test_a_photo_browsers_cannot_show_counts_its_preview_too(tmp_path):
    # The worker keeps an upright PNG of a TIFF for the pages; it counts in results_bytes once written.
    width, height = 161, 97
    rgb = np.random.default_rng(8).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "preview.png", format="PNG")
    as_tiff = results_bytes_bound(outputs=["png"], width=width, height=height, image_format="TIFF")
    as_jpeg = results_bytes_bound(outputs=["png"], width=width, height=height, image_format="JPEG")
    assert as_tiff - as_jpeg >= (tmp_path / "preview.png").stat().st_size
