"""Request bodies of the write endpoints: an unknown field is a 400 that names it (never silently ignored), and
sizes take human units ("2GB", "500MiB") as well as integers, as the CLI's --max-size does."""
from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from PIL import Image

from inference.models import DepthJob
from models_registry.models import WeightDownload

WRITES = [
    ("/api/models/cache/optimize", {"dry_run": True}),
    ("/api/models/cache/clear", {"confirm": True}),
    ("/api/models/MiDaS_small/download", {}),
    ("/api/models/MiDaS_small/verify", {}),
    ("/api/models/MiDaS_small/convert", {"format": "safetensors"}),
]


def _unknown_named(response, *names: str) -> dict:
    assert response.status_code == 400, response.content[:400]
    body = response.json()
    for name in names:
        assert name in body["message"], body["message"]
    assert "this endpoint accepts" in body["message"]
    return body


@pytest.mark.parametrize(("path", "body"), WRITES)
def test_registry_writes_refuse_unknown_fields(staff_client, small_model, path, body):
    response = staff_client.post(path, {**body, "max_size_typo": "2GB", "colour": 1}, format="json")
    _unknown_named(response, "max_size_typo", "colour")
    assert not WeightDownload.objects.exists()


def test_import_refuses_unknown_fields_before_reading_the_file(staff_client, small_model, small_pt):
    with open(small_pt, "rb") as handle:
        response = staff_client.post("/api/models/import", {"file": handle, "modle": "MiDaS_small"},
                                     format="multipart")
    _unknown_named(response, "modle")


def _png() -> io.BytesIO:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "PNG")
    buffer.seek(0)
    buffer.name = "tiny.png"
    return buffer


def test_prediction_create_refuses_unknown_fields(user_client, small_model):
    response = user_client.post("/api/predictions/", {"image": _png(), "colourmap": "magma"}, format="multipart")
    _unknown_named(response, "colourmap")
    assert not DepthJob.objects.exists()


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("max_bytes", "2GB", 2_000_000_000),
    ("max_bytes", "500MiB", 500 * 1024**2),
    ("max_bytes", 12345, 12345),
    ("max_size", "2GB", 2_000_000_000),
])
def test_optimize_sizes_take_human_units(staff_client, field, value, expected):
    response = staff_client.post("/api/models/cache/optimize", {field: value}, format="json")
    assert response.status_code == 200, response.content[:400]
    assert response.json()["max_bytes"] == expected


@pytest.mark.parametrize("value", ["2 parsecs", -5, True, "", [1]])
def test_optimize_refuses_sizes_it_cannot_read(staff_client, value):
    response = staff_client.post("/api/models/cache/optimize", {"max_bytes": value}, format="json")
    assert response.status_code == 400 and "max_bytes" in response.json()["message"]


def test_cli_reads_the_same_units(capsys, db):
    import json

    call_command("models", "optimize", "--max-size", "500MiB", "--json")
    assert json.loads(capsys.readouterr().out)["max_bytes"] == 500 * 1024**2
