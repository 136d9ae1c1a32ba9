"""The classic bad uploads, through the API and the web form: each is processed correctly or refused clearly, never a 500."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.urls import reverse

from inference.models import DepthJob
from depthsite.testing import images
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
CASES = images.bad_uploads()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_api(api, request, run_jobs, case):
    name, data, expected = CASES[case]
    request.getfixturevalue("small_model" if isinstance(expected, int) else "cached_small")
    with run_jobs():
        response = api.post("/api/predictions/", {"image": upload(data, name), "outputs": ["npy", "png"]},
                            format="multipart")
    if isinstance(expected, int):
        assert response.status_code == expected, response.content
        body = response.json()
        assert body["message"].startswith("image: ") and body["extra"]["field"] == "image"
        assert body["extra"]["kind"] in ("not_an_image", "truncated", "damaged", "empty", "too_many_pixels")
        assert not DepthJob.objects.exists()
        return
    assert response.status_code == 202, response.content
    job = DepthJob.objects.get()
    assert job.status == "succeeded", job.error
    _, width, height = expected
    assert (job.image_width, job.image_height) == (width, height)
    depth = np.load(Path(settings.MEDIA_ROOT) / job.result_files["npy"])
    assert depth.shape == (height, width) and np.isfinite(depth).all()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_web_form(client, user, request, run_jobs, case):
    client.force_login(user)
    name, data, expected = CASES[case]
    request.getfixturevalue("small_model" if isinstance(expected, int) else "cached_small")
    with run_jobs():
        response = client.post(reverse("inference:upload"), {"image": upload(data, name), "model": "MiDaS_small",
                                                             "colormap": "inferno", "outputs": ["png"]})
    if isinstance(expected, int):
        assert response.status_code == expected
        assert 'id="image-errors"' in response.content.decode()
        assert not DepthJob.objects.exists()
        return
    assert response.status_code == 302
    job = DepthJob.objects.get()
    assert job.status == "succeeded", job.error
    page = client.get(response["Location"])
    assert page.status_code == 200 and 'class="badge succeeded"' in page.content.decode()
