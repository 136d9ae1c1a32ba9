"""The domain states facts; each door says what to do in its own words (issue 13).

An import whose weights fit several models: the service says "say which one", the command adds its option
(--model), the API its field (model). An export onto an existing file: the command adds --force. Weights
that differ from the pin, nothing cached to convert from: the command adds the command that helps, the API
states the fact with its kind. Neither door's words reach the other's users.
"""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from depthsite.exceptions import ConflictError, InvalidRequestError, WeightFileError
from models_registry import cachefs
from models_registry.models import RegisteredModel, WeightFile
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


def speaks_no_cli(body: dict) -> None:
    text = json.dumps(body)
    assert "--" not in text and "manage.py" not in text, text


def cli_error(*args: str, capsys) -> dict:
    with pytest.raises(Exception):
        call_command("models", *args, "--json")
    return json.loads(capsys.readouterr().out)["error"]


def test_weights_that_differ_from_the_pin_name_the_reset_only_in_the_command(small_model, small_pt, staff_client,
                                                                             capsys):
    small_model.expected_content_digest = "0" * 64
    small_model.save()
    response = staff_client.post("/api/models/import", {"file": SimpleUploadedFile("mine.pt", small_pt.read_bytes())},
                                 format="multipart")
    assert response.status_code == 409
    body = response.json()
    assert body["extra"]["kind"] == "pin_differs" and body["extra"]["pinned"] == "0" * 64
    assert body["message"].startswith("the weights in mine.pt differ from the pinned weights of MiDaS_small")
    speaks_no_cli(body)

    error = cli_error("import", str(small_pt), capsys=capsys)
    assert error["code"] == "integrity"
    assert error["message"].endswith("; to accept them, reset the pin: `python manage.py models pin --model "
                                     "MiDaS_small --reset`")
    assert not WeightFile.objects.exists()


def test_nothing_cached_to_convert_names_the_download_only_in_the_command(small_model, staff_client, capsys):
    response = staff_client.post("/api/models/MiDaS_small/convert?wait=1", {"format": "h5"}, format="json")
    assert response.status_code == 404
    body = response.json()
    assert body["message"] == "no healthy cached weights of MiDaS_small on this node; download or import them first"
    assert body["extra"] == {"kind": "not_cached", "model": "MiDaS_small"}

    error = cli_error("convert", "--model", "MiDaS_small", "--to", "h5", capsys=capsys)
    assert error["code"] == "not_found"
    assert error["message"].endswith("; `python manage.py models download --model MiDaS_small` (or `models import "
                                     "PATH --model MiDaS_small`)")


def test_a_cached_file_changed_on_disk_is_reported_without_a_command(cached_small, staff_client):
    path = cachefs.absolute(cached_small.path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only its hash tells
    path.write_bytes(bytes(data))
    response = staff_client.get("/api/models/MiDaS_small/export?format=pt&bundle=1")
    assert response.status_code == 409
    body = response.json()
    assert body["extra"] == {"kind": "changed_on_disk", "model": "MiDaS_small", "format": "pt"}
    speaks_no_cli(body)
    cached_small.refresh_from_db()
    assert cached_small.health == "corrupt"


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


def test_a_full_disk_names_optimize_with_its_flag_only_in_the_command(tmp_path):
    from depthsite.commands import cli_message

    error = cachefs.disk_full_error(tmp_path / "w.pt")
    assert error.extra["kind"] == "disk_full" and "--" not in error.message
    message, hint = cli_message(error)
    assert message == f"{error.message}; `python manage.py models optimize --max-size SIZE` frees space"
    assert hint == "`python manage.py models optimize --max-size SIZE` frees space"
