"""A photo over DEPTHSITE_MAX_UPLOAD_BYTES: the form says how big the file is and what the limit is, next to the
file field, and keeps the user's other choices; the API says the same with 413 and a JSON body."""
from __future__ import annotations

import re

import pytest
from django.urls import reverse

from inference.models import DepthJob
from tests.jobs.conftest import upload

LIMIT = 100_000


@pytest.fixture
def web(client, user):
    client.force_login(user)
    return client


# 300 kB: over the limit plus the envelope allowance, refused from Content-Length; 120 kB: within the
# allowance, refused while the file streams in. Both must parse the fields that follow the file.
@pytest.mark.parametrize(("size", "shown"), [(300_000, "300.0 KB"), (120_000, "120.0 KB")])
def test_form_names_sizes_next_to_the_file_and_keeps_the_other_fields(web, small_model, run_jobs, settings,
                                                                      size, shown):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = LIMIT
    form = {"image": upload(b"\xff\xd8" + b"\0" * (size - 2), "big.jpg"), "model": "MiDaS_small",
            "colormap": "magma", "outputs": ["png", "npy"], "fov": "45"}
    with run_jobs():
        response = web.post(reverse("inference:upload"), form)

    assert response.status_code == 413
    page = response.content.decode()
    assert "This field is required" not in page
    image_errors = re.search(r'<ul class="errorlist" id="image-errors">(.*?)</ul>', page, re.S)
    assert image_errors and f"The file is {shown}; the limit is 100.0 KB" in image_errors.group(1)
    assert response.context["selected_colormap"] == "magma"
    assert response.context["selected_outputs"] == ["png", "npy"]
    assert response.context["selected_model"] == "MiDaS_small"
    assert response.context["form"]["fov"].value() == "45"
    assert not DepthJob.objects.exists()


@pytest.mark.parametrize(("size", "shown"), [(300_000, "the file is about 300."), (120_000, "the file is 120.0 KB")])
def test_api_says_the_same_with_413_and_json(api, small_model, run_jobs, settings, size, shown):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = LIMIT
    with run_jobs():
        response = api.post("/api/predictions/", {"image": upload(b"\xff\xd8" + b"\0" * (size - 2), "big.jpg"),
                                                  "colormap": "magma"}, format="multipart")
    assert response.status_code == 413
    body = response.json()
    assert body["message"].startswith(f"image: {shown}") and "; the limit is 100.0 KB" in body["message"]
    assert body["extra"]["field"] == "image" and body["extra"]["limit"] == LIMIT
    assert not DepthJob.objects.exists()
