"""`--json` commands that fail answer with one JSON error object on stdout and a non-zero exit.

The commands run through `run_from_argv`, as manage.py runs them (argparse, then execute, then sys.exit), in
this process; one subprocess run checks the same on a real `manage.py`.
"""
from __future__ import annotations

import json

import pytest
from django.core.management import load_command_class
from django.db import connections

from depthsite.testing.cli import make_site

pytestmark = pytest.mark.django_db

# A failing call per command that has --json, with the error code it must carry.
FAILING = {
    "list": (["list", "--json", "--colour"], "usage"),
    "info": (["info", "--json", "--detailed=yes"], "usage"),
    "verify": (["verify", "--json", "--model", "NoSuchNet"], "not_found"),
    "convert": (["convert", "--json", "--model", "MiDaS_small", "--to", "onnx"], "invalid"),
    "convert-missing-option": (["convert", "--json", "--model", "MiDaS_small"], "usage"),
    "export": (["export", "--json", "--model", "MiDaS_small", "--output", "{tmp}/out.pt"], None),
    "import": (["import", "--json", "{tmp}/missing.pt"], None),
    "optimize": (["optimize", "--json", "--max-size", "lots"], None),
    "clear": (["clear", "--json", "--model", "NoSuchNet", "--yes"], "not_found"),
    "pin": (["pin", "--json", "--model", "MiDaS_small", "--sha256", "not-a-hash"], None),
    "download": (["download", "--json", "--model", "MiDaS_small", "--offline"], "offline"),
}


def run_models(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    # manage.py closes the connections when a command ends; here they hold the test's transaction.
    monkeypatch.setattr(connections, "close_all", lambda: None)
    command = load_command_class("models_registry", "models")
    with pytest.raises(SystemExit) as exited:
        command.run_from_argv(["manage.py", "models", *argv])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.mark.parametrize("case", list(FAILING))
def test_a_failing_json_command_prints_one_error_object(case, capsys, monkeypatch, tmp_path, small_model):
    argv, expected_code = FAILING[case]
    code, out, err = run_models([arg.replace("{tmp}", str(tmp_path)) for arg in argv], capsys, monkeypatch)
    assert code not in (0, None)
    payload = json.loads(out)  # exactly one JSON document: anything else on stdout makes this raise
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message", "hint"}
    error = payload["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if expected_code:
        assert error["code"] == expected_code
    assert err.strip().startswith("error: ")  # the person at the terminal still reads one line


def test_the_hint_says_how_to_get_weights_when_offline(capsys, monkeypatch, small_model):
    _, out, _ = run_models(FAILING["download"][0], capsys, monkeypatch)
    error = json.loads(out)["error"]
    assert "DEPTHSITE_MODEL_MIRROR" in error["message"]
    assert error["hint"] == "`python manage.py models import PATH --model MiDaS_small` imports it"


def test_without_json_stdout_stays_empty(capsys, monkeypatch, small_model):
    code, out, err = run_models(["verify", "--model", "NoSuchNet"], capsys, monkeypatch)
    assert code not in (0, None) and out == "" and err.startswith("error: ")


def test_a_json_success_is_unchanged(capsys, monkeypatch, small_model):
    monkeypatch.setattr(connections, "close_all", lambda: None)
    load_command_class("models_registry", "models").run_from_argv(["manage.py", "models", "list", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert any(row["name"] == "MiDaS_small" for row in rows)


@pytest.mark.slow
def test_real_manage_py_prints_the_error_object(tmp_path):
    site = make_site(tmp_path / "site")
    result = site.manage("models", "download", "--model", "NoSuchNet", "--json")
    assert result.returncode != 0
    assert json.loads(result.stdout)["error"]["code"] == "not_found"
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_verify_that_finds_bad_files_prints_its_report_alone(capsys, monkeypatch, small_model):
    """verify --json already answered with its results; the failing exit adds no second JSON object."""
    from models_registry.models import WeightFile

    WeightFile.objects.create(model=small_model, format="pt", path="MiDaS_small/gone.pt", size=10, sha256="0" * 64,
                              content_digest="0" * 64, dtype="float32", health="ok", node="test-node")
    code, out, err = run_models(["verify", "--json", "--no-functional"], capsys, monkeypatch)
    assert code == 1
    report = json.loads(out)
    assert isinstance(report, list) and len(report) == 1 and report[0]["health"] != "ok"
    assert "not ok" in err
