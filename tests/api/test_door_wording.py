"""The domain states facts; each door says what to do in its own words (issue 13).

An import whose weights fit several models: the service says "say which one", the command adds its option
(--model), the API its field (model). An export onto an existing file: the command adds --force. Neither
door's words reach the other's users.
"""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from depthsite.exceptions import ConflictError, InvalidRequestError, WeightFileError
from models_registry.models import RegisteredModel
from models_registry.services.export import weight_export
from models_registry.services.imports import weight_import

pytestmark = pytest.mark.django_db


@pytest.fixture
def twin_model(small_model):
    return RegisteredModel.objects.create(name="my_small", display_name="Fine-tuned small",
                                          architecture="MiDaS_small", file_name="my_small.pt")


def test_the_service_states_the_fact_without_a_doors_words(twin_model, small_pt):
    with pytest.raises(InvalidRequestError) as caught:
        weight_import(path=small_pt)
    assert caught.value.extra["kind"] == "ambiguous_model"
    assert set(caught.value.extra["candidates"]) == {"MiDaS_small", "my_small"}
    assert "--" not in caught.value.message and "field" not in caught.value.message


def test_the_command_names_its_option(twin_model, small_pt, capsys):
    with pytest.raises(Exception):
        call_command("models", "import", str(small_pt), "--json")
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["message"].endswith("; choose one with --model NAME")
    assert error["hint"] == "choose one with --model NAME"


def test_the_api_names_its_field(twin_model, small_pt, staff_client):
    upload = SimpleUploadedFile("w.pt", small_pt.read_bytes())
    response = staff_client.post("/api/models/import", {"file": upload}, format="multipart")
    assert response.status_code == 400
    body = response.json()
    assert body["message"].endswith("; send the model field with one of them") and "--" not in body["message"]
    assert body["extra"]["hint"] == "send the model field with one of them"
    assert body["extra"]["kind"] == "ambiguous_model"


@pytest.mark.slow
def test_an_export_onto_an_existing_file_says_force_only_in_the_command(cached_small, small_model, tmp_path, capsys):
    target = tmp_path / "out.pt"
    target.write_bytes(b"mine")
    with pytest.raises(ConflictError) as caught:
        weight_export(model=small_model, fmt="pt", output=target)
    assert "--force" not in caught.value.message and caught.value.extra["kind"] == "exists"
    with pytest.raises(Exception):
        call_command("models", "export", "--model", "MiDaS_small", "--format", "pt", "--output", str(target), "--json")
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["message"].endswith("; pass --force to overwrite it")
    assert target.read_bytes() == b"mine"


def test_an_upload_is_named_as_its_sender_named_it(small_model, staff_client):
    response = staff_client.post("/api/models/import", {"file": SimpleUploadedFile("mine.pt", b"not weights at all")},
                                 format="multipart")
    assert response.status_code == 422
    body = response.json()
    assert body["message"].startswith("mine.pt is not a weight file depthsite knows")
    assert ".tmp-" not in json.dumps(body)


def test_the_weight_file_of_a_bundle_is_named_inside_it(db, tmp_path):
    bundle = tmp_path / "mine.tar"
    with tarfile.open(bundle, "w") as archive:
        for name, data in (("manifest.json", json.dumps({"file": "w.pt"}).encode()), ("w.pt", b"not weights")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=bundle)
    assert caught.value.message.startswith("mine.tar/w.pt is not a weight file depthsite knows")
    assert caught.value.file == "mine.tar/w.pt"
