"""Provenance told truthfully: an imported file is recorded as imported (original name, by whom, when, sha256),
not as the catalogue's download; exported bundles say the same; importing pins unless told not to."""
from __future__ import annotations

import hashlib
import json
import tarfile

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from models_registry.choices import Health
from models_registry.models import RegisteredModel, WeightFile
from models_registry.services.export import weight_export
from models_registry.services.imports import weight_import
from depthsite.testing.weightserver import WeightServer
from tests.support.operators import grant_operator_permissions


def _model() -> RegisteredModel:
    return RegisteredModel.objects.get(name="MiDaS_small")


def test_cli_import_records_the_file_and_pins_it(small_model, small_pt, capsys):
    call_command("models", "import", str(small_pt), "--json")

    body = json.loads(capsys.readouterr().out)
    weight_file = WeightFile.objects.get(model=small_model)
    sha256 = hashlib.sha256(small_pt.read_bytes()).hexdigest()
    assert (weight_file.origin, weight_file.origin_source, weight_file.origin_by) == ("import", small_pt.name, "cli")
    assert body["provenance"] == {"kind": "import", "source": small_pt.name, "by": "cli",
                                  "at": weight_file.created_at.isoformat(), "sha256": sha256}
    assert body["pinned"] is True
    model = _model()
    assert model.expected_sha256 == sha256 and model.expected_content_digest == weight_file.content_digest
    assert model.sha256_pinned_from == f"import of {small_pt.name} by cli"
    assert "github" not in json.dumps(body).lower()


def test_cli_no_pin_leaves_the_model_unpinned(small_model, small_pt, capsys):
    call_command("models", "import", str(small_pt), "--no-pin", "--json")
    assert json.loads(capsys.readouterr().out)["pinned"] is False
    model = _model()
    assert not model.expected_sha256 and not model.expected_content_digest


def test_non_pt_import_pins_the_digest_only_so_the_released_pt_still_downloads(small_model, write_checkpoint,
                                                                              small_pt, settings):
    imported = weight_import(path=write_checkpoint("safetensors"))
    model = _model()
    assert imported.pinned and model.expected_content_digest == imported.weight_file.content_digest
    assert not model.expected_sha256  # a safetensors file's sha256 says nothing about the released .pt

    with WeightServer(small_pt.parent) as server:
        settings.DEPTHSITE_MODEL_MIRROR = server.url
        from models_registry.services.download import weight_download

        small_model.refresh_from_db()
        # Same weights in the released format: accepted, and recorded as downloaded from the mirror.
        (small_pt.parent / small_model.file_name).write_bytes(small_pt.read_bytes())
        WeightFile.objects.filter(model=small_model).update(health=Health.CORRUPT)
        result = weight_download(model=small_model, fmt="pt")
    assert result.weight_file.origin == "download"
    assert result.weight_file.origin_source == server.url_for(small_model.file_name)


def test_api_import_records_the_name_sent_and_the_user_and_pin_false(small_model, small_pt):
    operator = get_user_model().objects.create_user("alice", "a@example.com", "pw-alice-12345", is_staff=True)
    grant_operator_permissions(operator)  # importing needs models_registry.change_registeredmodel
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=operator).key}")
    with open(small_pt, "rb") as handle:
        response = client.post("/api/models/import", {"file": handle, "pin": "false"}, format="multipart")
    assert response.status_code == 201, response.content[:300]
    body = response.json()
    assert body["provenance"]["kind"] == "import" and body["provenance"]["by"] == "alice"
    assert body["provenance"]["source"] == small_pt.name and body["file"]["provenance"]["by"] == "alice"
    assert body["pinned"] is False and not _model().expected_sha256


@pytest.mark.slow
def test_bundle_of_an_imported_file_says_imported_not_github(small_model, small_pt, tmp_path):
    weight_import(path=small_pt, imported_by="bob")
    output = tmp_path / "b.tar"
    weight_export(model=_model(), fmt="pt", output=output, bundle=True)
    with tarfile.open(output) as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())
    assert manifest["source_url"] == ""
    assert manifest["provenance"]["kind"] == "import" and manifest["provenance"]["by"] == "bob"
    assert manifest["provenance"]["source"] == small_pt.name
    assert "github" not in json.dumps(manifest).lower()


@pytest.mark.parametrize("pin", [True, False])
def test_import_into_a_pinned_model_keeps_its_pin(small_model, small_pt, write_checkpoint, pin):
    weight_import(path=small_pt)
    pinned = _model().expected_sha256
    again = weight_import(path=write_checkpoint("safetensors"), pin=pin)
    assert again.pinned is False and _model().expected_sha256 == pinned
