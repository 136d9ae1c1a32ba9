"""`manage.py models ...`: output, JSON, exit codes, and the foundation's whole walk-through in real processes."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
from django.core.management import CommandError, call_command

from models_registry import cachefs
from models_registry.models import WeightFile
from depthsite.testing.cli import PROJECT_ROOT, make_site

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("models", *args, stdout=out)
    return out.getvalue()


def test_list_shows_the_catalogue():
    text = run("list")
    for name in ("DPT_Large", "DPT_Hybrid", "MiDaS", "MiDaS_small", "midas_v21_small_256.pt"):
        assert name in text


def test_list_json_is_only_json():
    rows = json.loads(run("list", "--json"))
    small = next(row for row in rows if row["name"] == "MiDaS_small")
    assert small["source_url"].endswith("/v2_1/midas_v21_small_256.pt")
    assert small["approx_bytes"] > 80_000_000
    assert small["cached"] == []


def test_info_human_and_json(cached_small):
    text = run("info", "--detailed")
    assert "Cache Directory:" in text and "Total Files: 1" in text
    assert "PT: 1 file" in text and cached_small.sha256 in text
    info = json.loads(run("info", "--json"))
    assert info["totals"] == {"models": 1, "files": 1, "bytes": cached_small.size}


def test_verify_json_and_exit_code(cached_small):
    assert json.loads(run("verify", "--json"))[0]["health"] == "ok"
    cachefs.absolute(cached_small.path).write_text("<html>oops</html>")
    out = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("models", "verify", "--json", stdout=out)
    assert caught.value.returncode == 1
    report = json.loads(out.getvalue())
    assert report[0]["health"] == "corrupt" and "HTML page" in report[0]["reason"]


def test_clear_refuses_without_yes_when_not_a_terminal(cached_small):
    with pytest.raises(CommandError) as caught:
        call_command("models", "clear", "--model", "MiDaS_small")  # pytest's stdin is not a terminal
    assert "--yes" in str(caught.value)
    assert WeightFile.objects.count() == 1
    run("clear", "--model", "MiDaS_small", "--yes")
    assert WeightFile.objects.count() == 0


def test_unknown_model_and_format_are_clear_errors(cached_small):
    with pytest.raises(CommandError) as caught:
        run("convert", "--model", "nope", "--to", "h5")
    assert "unknown model 'nope'" in str(caught.value)
    with pytest.raises(CommandError) as caught:
        run("convert", "--model", "MiDaS_small", "--to", "onnx")
    assert "unknown format 'onnx'" in str(caught.value)


def test_optimize_dry_run_touches_nothing(cached_small):
    orphan = cachefs.cache_root() / "MiDaS_small" / "stray.bin"
    orphan.write_bytes(b"123")
    text = run("optimize", "--dry-run")
    assert "orphan" in text and "Would free 3 B" in text
    assert orphan.exists()
    plan = json.loads(run("optimize", "--json"))
    assert plan["executed"] and plan["freed_bytes"] == 3
    assert not orphan.exists()


def test_optimize_rejects_a_bad_size():
    with pytest.raises(CommandError) as caught:
        run("optimize", "--max-size", "lots")
    assert "not a size" in str(caught.value)


def test_pin_show_set_reset():
    assert "no pinned sha256" in run("pin", "--model", "MiDaS")
    run("pin", "--model", "MiDaS", "--sha256", "b" * 64)
    assert json.loads(run("pin", "--model", "MiDaS", "--json"))["sha256"] == "b" * 64
    run("pin", "--model", "MiDaS", "--reset")
    assert json.loads(run("pin", "--model", "MiDaS", "--json"))["sha256"] == ""


@pytest.mark.slow
def test_foundation_walkthrough_in_real_processes(tmp_path, small_pt):
    """The issue's 'done when', command by command, with real exit codes and stderr."""
    site = make_site(tmp_path / "site")

    imported = site.manage("models", "import", str(small_pt))
    assert imported.returncode == 0, imported.stderr
    assert "imported MiDaS_small [pt]" in imported.stdout

    info = site.manage("models", "info")
    assert info.returncode == 0 and "MiDaS_small" in info.stdout and "PT: 1 file" in info.stdout

    converted = site.manage("models", "convert", "--model", "MiDaS_small", "--to", "h5")
    assert converted.returncode == 0, converted.stderr

    exported = site.manage("models", "export", "--model", "MiDaS_small", "--format", "pkl",
                           "--output", str(tmp_path / "x.pkl"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "x.pkl").stat().st_size > 80_000_000

    verified = site.manage("models", "verify", "--no-functional")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count(": ok\n") == 2

    h5 = site.cache_dir / "MiDaS_small" / "midas_v21_small_256.h5"
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    broken = site.manage("models", "verify", "--no-functional")
    assert broken.returncode == 1
    assert "MiDaS_small [h5]: corrupt - " in broken.stdout and "midas_v21_small_256.h5" in broken.stdout
    assert "truncated" in broken.stdout
    assert broken.stderr.strip() == "error: 1 of 2 weight file(s) not ok"

    planned = site.manage("models", "optimize", "--dry-run")
    assert planned.returncode == 0 and "corrupt" in planned.stdout and h5.exists()
    optimized = site.manage("models", "optimize")
    assert optimized.returncode == 0 and "Freed" in optimized.stdout
    assert not h5.exists()

    refused = site.manage("models", "clear", "--model", "MiDaS_small")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    cleared = site.manage("models", "clear", "--model", "MiDaS_small", "--yes")
    assert cleared.returncode == 0, cleared.stderr
    listing = json.loads(site.manage("models", "info", "--json").stdout)
    assert listing["totals"]["files"] == 0
    assert not (site.cache_dir / "MiDaS_small").exists()


@pytest.mark.slow
def test_commands_that_need_no_tensors_do_not_import_torch(tmp_path):
    site = make_site(tmp_path / "site")
    probe = ("import sys, django; django.setup(); from django.core.management import call_command; "
             "call_command('models', *sys.argv[1:]); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    for args in (["list"], ["info"], ["optimize", "--dry-run"], ["clear", "--yes"]):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", probe, *args], cwd=PROJECT_ROOT, env=site.env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("NO-TORCH"), args
        assert time.monotonic() - started < 3.0, args


@pytest.mark.slow
def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    site = make_site(tmp_path / "site")
    result = site.manage("models", "export", "--model", "MiDaS_small", "--output", str(tmp_path / "x.pt"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no healthy cached weights of MiDaS_small on this node; download or import them first; "
        "`python manage.py models download --model MiDaS_small` (or `models import PATH --model MiDaS_small`)"
    ]
    missing = site.manage("models", "import", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "no such file" in missing.stderr
