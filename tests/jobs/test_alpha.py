"""Transparency: what happens to an alpha channel is stated (form, API docs, the job page of a photo that had
one), and the statement is what the decoder does: alpha dropped, stored colours kept, no background blend."""
from __future__ import annotations

import io

import numpy as np
import pytest
from django.urls import reverse
from PIL import Image

from inference.images import ALPHA_NOTE, image_check, image_open
from inference.models import DepthJob
from tests.jobs.conftest import upload


def _png(mode: str, color, **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (4, 4), color).save(buffer, "PNG", **save)
    return buffer.getvalue()


def test_alpha_is_dropped_and_stored_colours_kept_as_the_note_says():
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: blended onto white it would be white
    image.putpixel((1, 0), (200, 10, 10, 64))  # mostly transparent red
    buffer = io.BytesIO()
    image.save(buffer, "PNG")

    rgb = image_open(buffer.getvalue()).rgb

    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [200, 10, 10]
    assert "dropped" in ALPHA_NOTE and "nothing is blended" in ALPHA_NOTE


@pytest.mark.parametrize(("data", "expected"), [
    (_png("RGBA", (1, 2, 3, 4)), True),
    (_png("LA", (1, 4)), True),
    (_png("P", 0, transparency=0), True),
    (_png("RGB", (1, 2, 3)), False),
    (_png("L", 7), False),
])
def test_transparency_is_found_from_the_header(data, expected):
    assert image_check(data).alpha is expected


def test_form_and_api_docs_state_it(client, user):
    client.force_login(user)
    page = client.get(reverse("inference:upload")).content.decode()
    assert 'id="alpha-note"' in page and "Transparency is dropped" in page
    schema = client.get("/api/schema/", {"format": "json"}).json()
    body = schema["paths"]["/api/predictions/"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    create = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]] if "$ref" in body else body
    assert ALPHA_NOTE in create["properties"]["image"]["description"]


@pytest.mark.parametrize(("data", "shown"), [(_png("RGBA", (9, 9, 9, 0)), True), (_png("RGB", (9, 9, 9)), False)])
def test_job_page_says_it_when_the_photo_had_alpha(client, user, small_model, run_jobs, data, shown, monkeypatch):
    client.force_login(user)
    with run_jobs():
        client.post(reverse("inference:upload"), {"image": upload(data, "a.png", "image/png"),
                                                  "model": "MiDaS_small", "colormap": "inferno", "outputs": ["png"]})
    job = DepthJob.objects.get()
    assert job.image_alpha is shown  # read once, at upload
    # A page view never parses the stored photo again (its header is a stranger's: per-view work must not be).
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("the job page opened the stored photo"))
    page = client.get(reverse("inference:job_detail", args=[job.pk])).content.decode()
    assert ("This photo had transparency" in page) is shown


def test_a_job_from_before_the_column_shows_no_note(client, user, small_model, run_jobs):
    client.force_login(user)
    with run_jobs():
        client.post(reverse("inference:upload"), {"image": upload(_png("RGBA", (9, 9, 9, 0)), "a.png", "image/png"),
                                                  "model": "MiDaS_small", "colormap": "inferno", "outputs": ["png"]})
    DepthJob.objects.update(image_alpha=None)
    page = client.get(reverse("inference:job_detail", args=[DepthJob.objects.get().pk])).content.decode()
    assert "This photo had transparency" not in page
