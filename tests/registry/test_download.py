"""Weight acquisition against a real HTTP server on 127.0.0.1: resume, retries, pins, mirrors, offline,
single flight across processes, a killed downloader, a full disk, and the download commands."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from models_registry import cachefs, fetch
from depthsite.choices import RunStatus
from models_registry.choices import Health
from depthsite.exceptions import (
    ConflictError,
    DiskFullError,
    DownloadError,
    DigestMismatchError,
    OfflineError,
)
from models_registry.models import WeightDownload, WeightFile
from models_registry.services import download as download_service
from models_registry.services import transfer
from models_registry.services.catalogue import model_pin
from models_registry.services.download import download_enqueue, weight_download
from models_registry.services.records import weights_read
from models_registry.services.resolve import weights_resolve, weights_use
from depthsite.testing.weightserver import WeightServer

REPO = Path(__file__).resolve().parents[2]
FILE_NAME = "midas_v21_small_256.pt"
MB = 1024 * 1024


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_arrays):
    """A folder with the official-layout MiDaS_small checkpoint at the mirror path and the release path."""
    from models_registry.formats import write_weights

    root = tmp_path_factory.mktemp("served")
    path = root / FILE_NAME
    write_weights(small_arrays, path, "pt", {})
    (root / "v2_1").mkdir()
    os.link(path, root / "v2_1" / FILE_NAME)
    return {"root": root, "path": path, "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.fixture
def server(served):
    with WeightServer(served["root"]) as running:
        yield running


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_BACKOFF_SECONDS", 0.01)


@pytest.fixture
def mirror(settings, server):
    settings.DEPTHSITE_MODEL_MIRROR = server.url
    return server


def _leftovers() -> list[str]:
    """Every file under the cache except lock files: temporaries and partials must not survive a failure."""
    root = cachefs.cache_root()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not str(p.relative_to(root)).startswith(cachefs.LOCK_DIR))


def _assert_nothing_cached(model) -> None:
    assert _leftovers() == []
    assert not WeightFile.objects.filter(model=model).exists()
    model.refresh_from_db()
    assert model.expected_sha256 == ""


# --- a clean download ----------------------------------------------------------------------------


def test_clean_download_from_catalogue_url_is_recorded_and_pinned(small_model, server, served):
    url = server.url_for(f"v2_1/{FILE_NAME}")
    small_model.source_url = url
    small_model.save()

    started = time.monotonic()
    with CaptureQueriesContext(connection) as queries:
        result = weight_download(model=small_model)
    elapsed = time.monotonic() - started

    assert result.transferred and result.pinned and result.source_url == url
    assert result.bytes_transferred == served["size"] and result.resumed_from == 0
    weight_file = result.weight_file
    path = cachefs.absolute(weight_file.path)
    assert path == cachefs.cache_root() / "MiDaS_small" / FILE_NAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == served["sha256"] == weight_file.sha256
    assert weight_file.health == Health.OK and weight_file.functional_hash and weight_file.content_digest
    small_model.refresh_from_db()
    assert small_model.expected_sha256 == served["sha256"]
    assert small_model.expected_size == served["size"]
    assert small_model.expected_content_digest == weight_file.content_digest
    assert small_model.sha256_pinned_from == url and small_model.sha256_pinned_at is not None
    row = WeightDownload.objects.get(model=small_model)
    assert row.status == RunStatus.SUCCEEDED and row.weight_file_id == weight_file.pk
    assert row.bytes_done == row.bytes_total == served["size"] and row.source_url == url
    # Progress is saved on the row at most every PROGRESS_INTERVAL, not once per 1 MiB chunk.
    progress_writes = [q for q in queries.captured_queries
                       if q["sql"].startswith("UPDATE") and 'SET "bytes_done"' in q["sql"]]
    assert 1 <= len(progress_writes) <= elapsed / transfer.PROGRESS_INTERVAL_SECONDS + 3
    assert _leftovers() == [f"MiDaS_small/{FILE_NAME}"]
    assert [(r.status, r.range) for r in server.gets()] == [(200, None)]

    again = weight_download(model=small_model)
    assert not again.transferred and again.weight_file.pk == weight_file.pk
    assert len(server.gets()) == 1
    assert WeightDownload.objects.filter(model=small_model).count() == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_bytes_rate_and_total(small_model, mirror):
    # The command's bar is the service's progress callback; the service itself draws nothing.
    from models_registry.management.download import terminal_bar

    screen = _Terminal()
    with terminal_bar("MiDaS_small", screen) as bar:
        weight_download(model=small_model, on_progress=bar)
    shown = screen.getvalue()
    assert "MiDaS_small" in shown and "100%" in shown and "MB/s" in shown


def test_no_bar_where_nobody_watches(small_model, mirror, capsys):
    from models_registry.management.download import terminal_bar

    with terminal_bar("MiDaS_small", io.StringIO()) as bar:
        assert bar is None
        weight_download(model=small_model, on_progress=bar)
    assert capsys.readouterr().err == ""


# --- interrupted transfers -------------------------------------------------------------------------


def test_dropped_connection_is_resumed_with_range_and_if_range(small_model, mirror, served):
    mirror.configure(drop_after=10 * MB)

    result = weight_download(model=small_model)

    first, second = mirror.gets()
    assert first.status == 200 and first.dropped and first.body_bytes == 10 * MB
    assert second.status == 206 and second.range == f"bytes={10 * MB}-" and second.if_range.startswith('"')
    assert result.resumed_from == 10 * MB and result.bytes_transferred == served["size"] - 10 * MB
    assert mirror.bytes_sent == served["size"]
    assert result.weight_file.sha256 == served["sha256"] and result.weight_file.health == Health.OK
    assert _leftovers() == [f"MiDaS_small/{FILE_NAME}"]


def test_server_without_range_support_restarts_cleanly(small_model, mirror, served):
    mirror.configure(ranges=False, drop_after=10 * MB)

    result = weight_download(model=small_model)

    first, second = mirror.gets()
    assert second.range == f"bytes={10 * MB}-" and second.status == 200  # asked to resume, got the whole file
    assert result.resumed_from == 0 and mirror.bytes_sent == served["size"] + 10 * MB
    assert result.weight_file.sha256 == served["sha256"]


def _partial(served, mirror, length: int, **meta) -> Path:
    """A partial file of the first `length` served bytes, with the sidecar a transfer would have written."""
    import requests

    url = f"{mirror.url}/{FILE_NAME}"
    head = requests.head(url, timeout=5).headers
    part = cachefs.model_dir("MiDaS_small") / f"{FILE_NAME}.part"
    with open(served["path"], "rb") as source:
        part.write_bytes(source.read(length))
    sidecar = {"url": url, "etag": head["ETag"], "last_modified": head["Last-Modified"], "total": served["size"]}
    part.with_name(part.name + ".json").write_text(json.dumps({**sidecar, **meta}))
    mirror.reset_counters()
    return part


def test_changed_file_on_server_restarts_from_zero(small_model, mirror, served):
    """A partial whose validator no longer matches (If-Range fails) is replaced, not spliced."""
    _partial(served, mirror, 10 * MB, etag='"an-older-version"')

    result = weight_download(model=small_model)

    (only,) = mirror.gets()
    assert only.if_range == '"an-older-version"' and only.status == 200
    assert result.resumed_from == 0 and result.weight_file.sha256 == served["sha256"]


def test_complete_partial_is_proven_with_one_byte(small_model, mirror, served):
    """A process killed while checking a complete file: the next one re-fetches only the last byte."""
    _partial(served, mirror, served["size"])

    result = weight_download(model=small_model)

    (only,) = mirror.gets()
    assert only.status == 206 and only.range == f"bytes={served['size'] - 1}-" and mirror.bytes_sent == 1
    assert result.weight_file.sha256 == served["sha256"]


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_html_page_is_refused_and_never_cached(small_model, mirror, content_type):
    mirror.configure(html=True, html_content_type=content_type)

    with pytest.raises(DownloadError, match="HTML page where weights were expected"):
        weight_download(model=small_model)

    assert len(mirror.gets()) == 1
    _assert_nothing_cached(small_model)
    assert WeightDownload.objects.get(model=small_model).status == RunStatus.FAILED


@pytest.mark.parametrize("status", [404, 403])
def test_missing_or_forbidden_is_a_clear_error_without_retries(small_model, mirror, status):
    mirror.configure(status=status, status_times=-1)

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    assert f"{mirror.url}/{FILE_NAME} answered {status}" in caught.value.message
    assert len(mirror.gets()) == 1
    _assert_nothing_cached(small_model)


def test_server_errors_are_retried_then_succeed(small_model, mirror, served):
    mirror.configure(status=500, status_times=2)

    result = weight_download(model=small_model)

    assert [r.status for r in mirror.gets()] == [500, 500, 200]
    assert result.weight_file.sha256 == served["sha256"]


def test_persistent_server_errors_give_up_after_bounded_attempts(small_model, mirror):
    mirror.configure(status=503, status_times=-1)

    with pytest.raises(DownloadError, match=f"after {fetch.RETRY_ATTEMPTS} failed attempts"):
        weight_download(model=small_model)

    assert len(mirror.gets()) == fetch.RETRY_ATTEMPTS
    _assert_nothing_cached(small_model)


def test_bytes_that_differ_from_the_pin_are_refused(small_model, mirror, served):
    pinned = "ab" * 32
    model_pin(model=small_model, sha256=pinned, source="operator")

    with pytest.raises(DigestMismatchError) as caught:
        weight_download(model=small_model)

    message = caught.value.message
    assert served["sha256"] in message and pinned in message
    assert message.endswith(f"If the new file is legitimate, reset the pin (the next download pins again) or pin "
                            f"sha256 {served['sha256']}") and "--" not in message
    assert caught.value.extra["kind"] == "pin_differs" and caught.value.extra["sha256"] == served["sha256"]
    assert _leftovers() == [] and not WeightFile.objects.exists()
    small_model.refresh_from_db()
    assert small_model.expected_sha256 == pinned


def test_a_known_pin_is_accepted_and_kept(small_model, mirror, served):
    model_pin(model=small_model, sha256=served["sha256"], size=served["size"], source="operator")

    result = weight_download(model=small_model)

    assert result.transferred and not result.pinned
    small_model.refresh_from_db()
    assert small_model.sha256_pinned_from == "operator"
    assert small_model.expected_content_digest == result.weight_file.content_digest


# --- mirrors and offline ---------------------------------------------------------------------------


def test_http_mirror_is_base_url_plus_file_name(small_model, mirror, served, settings):
    settings.DEPTHSITE_MODEL_MIRROR = mirror.url.replace("http://", "http://user:pw-mirror@")

    result = weight_download(model=small_model)

    assert [r.path for r in mirror.gets()] == [f"/{FILE_NAME}"]
    # Recorded as shown: the mirror's credentials are for the request only (every signed-in user reads these).
    assert result.source_url == f"{mirror.url}/{FILE_NAME}"
    small_model.refresh_from_db()
    assert small_model.sha256_pinned_from == result.source_url
    assert WeightDownload.objects.get(model=small_model).source_url == result.source_url


@pytest.mark.slow
def test_file_mirror_copies_from_a_folder(small_model, settings, served, server):
    settings.DEPTHSITE_MODEL_MIRROR = served["root"].as_uri()

    result = weight_download(model=small_model)

    assert result.transferred and result.source_url == (served["root"] / FILE_NAME).as_uri()
    assert result.weight_file.sha256 == served["sha256"] and result.pinned
    assert server.requests == []
    assert _leftovers() == [f"MiDaS_small/{FILE_NAME}"]


def test_file_mirror_without_the_file_is_a_clear_error(small_model, settings, tmp_path):
    settings.DEPTHSITE_MODEL_MIRROR = tmp_path.as_uri()

    with pytest.raises(DownloadError, match=f"has no file {FILE_NAME}"):
        weight_download(model=small_model)
    _assert_nothing_cached(small_model)


@pytest.mark.parametrize("how", ["setting", "argument"])
def test_offline_never_opens_a_connection(small_model, mirror, settings, monkeypatch, how):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used while offline")

    monkeypatch.setattr("requests.Session.request", no_network)
    settings.DEPTHSITE_OFFLINE = how == "setting"

    with pytest.raises(OfflineError) as caught:
        weight_download(model=small_model, offline=how == "argument" or None)

    assert caught.value.extra["kind"] == "offline" and "--" not in caught.value.message
    assert mirror.requests == []
    _assert_nothing_cached(small_model)


def test_offline_uses_the_cache(small_model, cached_small, mirror, settings):
    settings.DEPTHSITE_OFFLINE = True
    result = weight_download(model=small_model, offline=False)  # the setting wins over an explicit False
    assert not result.transferred and result.weight_file.pk == cached_small.pk
    assert mirror.requests == []


# --- disk space ------------------------------------------------------------------------------------


def test_too_little_free_space_is_refused_before_writing(small_model, mirror, monkeypatch):
    monkeypatch.setattr(cachefs, "disk_free", lambda path: 10 * MB)

    with pytest.raises(DiskFullError, match="not enough free disk space to download MiDaS_small"):
        weight_download(model=small_model)

    # The body was not read: only what the kernel's socket buffers took before the client hung up was sent.
    assert mirror.bytes_sent < 20 * MB
    _assert_nothing_cached(small_model)


# --- queue and resolution --------------------------------------------------------------------------


def test_enqueue_runs_the_task_with_the_id_and_refuses_a_second_active_one(
        small_model, mirror, served, django_capture_on_commit_callbacks):
    blocking = WeightDownload.objects.create(model=small_model, node="test-node")  # queued, fresh
    with pytest.raises(ConflictError, match=f"already queued on this node \\(download {blocking.pk}\\)"):
        download_enqueue(model=small_model)
    blocking.delete()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        queued = download_enqueue(model=small_model, requested_by="alice")
    assert len(callbacks) == 1

    queued.refresh_from_db()
    assert queued.status == RunStatus.SUCCEEDED and queued.task_id and queued.requested_by == "alice"
    assert queued.weight_file.sha256 == served["sha256"] and queued.bytes_done == served["size"]


@pytest.mark.slow
def test_a_running_row_whose_process_died_does_not_block(small_model, mirror):
    dead = WeightDownload.objects.create(model=small_model, node="test-node", status=RunStatus.RUNNING)

    result = weight_download(model=small_model)

    dead.refresh_from_db()
    assert dead.status == RunStatus.FAILED and "interrupted" in dead.error
    assert result.transferred


def test_resolve_prefers_cache_then_downloads_when_the_cache_is_damaged(small_model, cached_small, mirror, served):
    assert weights_resolve(model=small_model).pk == cached_small.pk
    assert mirror.requests == []

    path = cachefs.absolute(cached_small.path)
    with open(path, "rb+") as handle:
        handle.truncate(path.stat().st_size // 2)

    resolved = weights_resolve(model=small_model)

    cached_small.refresh_from_db()
    assert resolved.health == Health.OK and resolved.sha256 == served["sha256"]
    assert len(mirror.gets()) == 1


def test_resolve_converts_to_the_preferred_format(small_model, cached_small, settings, mirror):
    settings.DEPTHSITE_CACHE_FORMAT = "safetensors"

    resolved = weights_resolve(model=small_model)

    assert resolved.format == "safetensors" and resolved.content_digest == cached_small.content_digest
    assert weights_resolve(model=small_model).pk == resolved.pk
    assert mirror.requests == []


def test_resolve_offline_without_cache_is_a_clear_error(small_model, settings, mirror):
    settings.DEPTHSITE_OFFLINE = True
    with pytest.raises(OfflineError, match="is not cached on this node"):
        weights_resolve(model=small_model)
    assert mirror.requests == []


def test_resolve_loaded_marks_a_file_that_fails_to_load_and_goes_on(small_model, cached_small, mirror):
    from models_registry.services.export import weight_convert

    damaged = weight_convert(model=small_model, fmt="safetensors")  # preferred: it loads fastest
    with open(cachefs.absolute(damaged.path), "rb+") as handle:
        handle.seek(12)
        handle.write(b"\xff\xff\xff\xff")  # same size and magic, unreadable header

    weight_file, loaded = weights_use(model=small_model, use=weights_read)

    damaged.refresh_from_db()
    assert damaged.health == Health.CORRUPT and "header" in damaged.health_reason
    assert weight_file.pk == cached_small.pk and loaded.arrays
    assert mirror.requests == []


# --- commands --------------------------------------------------------------------------------------


def test_models_download_command_reports_pin_then_no_transfer(small_model, mirror, served, capsys):
    call_command("models", "download", "--model", "midas-small")
    out = capsys.readouterr().out
    assert f"pinned sha256 {served['sha256']}" in out and FILE_NAME in out

    call_command("models", "download", "--model", "MiDaS_small", "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["transferred"] is False and data["sha256"] == served["sha256"]

    call_command("models", "download", "--model", "MiDaS_small")
    out = capsys.readouterr().out
    assert out.startswith("already cached: MiDaS_small [pt]") and out.rstrip().endswith("(no transfer)")
    assert len(mirror.gets()) == 1


def test_models_download_command_error_is_one_line(small_model, mirror):
    mirror.configure(status=404, status_times=-1)
    with pytest.raises(CommandError, match="answered 404"):
        call_command("models", "download", "--model", "MiDaS_small")


def test_setup_models_noinput_downloads_the_named_model(small_model, mirror, served, capsys):
    call_command("setup_models", "--noinput", "--model", "MiDaS_small")

    out = capsys.readouterr().out
    assert "pinned sha256" in out and "1 of 1 model(s) ready" in out
    assert WeightFile.objects.get(model=small_model).sha256 == served["sha256"]


def test_setup_models_noinput_without_selection_downloads_nothing(small_model, mirror, capsys):
    call_command("setup_models", "--noinput")
    assert "nothing downloaded" in capsys.readouterr().out
    assert mirror.requests == []


def test_setup_models_on_a_terminal_shows_the_catalogue_and_asks(small_model, mirror, monkeypatch, capsys):
    from models_registry.selectors import model_list

    number = [m.name for m in model_list()].index("MiDaS_small") + 1
    answers = iter(["nope", "midas-small", str(number)])  # an unknown name is asked again; then MiDaS_small's number
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))

    call_command("setup_models")
    first, err = capsys.readouterr()
    call_command("setup_models")
    second = capsys.readouterr().out

    assert "unknown model 'nope'" in err
    assert "MiDaS_small" in first and "85.6 MB" in first and "pinned sha256" in first
    assert "pt (ok)" in second and "already cached" in second
    assert len(mirror.gets()) == 1


def test_setup_models_selection_parsing(small_model):
    from models_registry.management.commands.setup_models import parse_selection
    from models_registry.selectors import model_list

    models = list(model_list())
    number = [m.name for m in models].index("MiDaS_small") + 1
    assert [m.name for m in parse_selection(f"{number}, dpt_large", models)] == ["MiDaS_small", "DPT_Large"]
    assert len(parse_selection("all", models)) == len(models)
    assert parse_selection("", models) == []


# --- several processes (a SQLite file database shared by subprocesses) -----------------------------


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory):
    """A migrated SQLite file, made once per module by a subprocess; each test copies it."""
    folder = tmp_path_factory.mktemp("filedb")
    env = _subprocess_env(folder / "db.sqlite3", folder / "cache", "")
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=REPO, env=env,
                   check=True, timeout=180)
    return folder / "db.sqlite3"


def _subprocess_env(db: Path, cache: Path, mirror: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEPTHSITE_", "DJANGO_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "depthsite.settings",
        # This process's key: a partial download's sidecar names its source by an HMAC keyed with it, and the
        # site's processes share one key (the next download here must recognise the subprocess's partial).
        "DJANGO_SECRET_KEY": str(django_settings.SECRET_KEY),
        "DATABASE_URL": f"sqlite:///{db}",
        "DEPTHSITE_VAR_DIR": str(db.parent / "var"),
        "DEPTHSITE_CACHE_DIR": str(cache),
        "DEPTHSITE_MODEL_MIRROR": mirror,
        "DEPTHSITE_NODE": "test-node",
        "DEPTHSITE_OFFLINE": "0",
        "OMP_NUM_THREADS": "1",
    })
    return env


@pytest.fixture
def file_db(migrated_db, tmp_path):
    db = tmp_path / "db.sqlite3"
    shutil.copy(migrated_db, db)
    return db


def _download_command() -> list[str]:
    return [sys.executable, "manage.py", "models", "download", "--model", "MiDaS_small", "--json"]


@pytest.mark.slow
def test_four_processes_share_one_transfer(file_db, tmp_path, server, served):
    server.configure(rate=40 * MB)  # about 2 s: the others start while the first still holds the lock
    env = _subprocess_env(file_db, tmp_path / "cache", server.url)
    processes = [subprocess.Popen(_download_command(), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=180) for process in processes]

    assert [p.returncode for p in processes] == [0, 0, 0, 0], [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    assert sorted(r["transferred"] for r in results) == [False, False, False, True]
    assert {r["sha256"] for r in results} == {served["sha256"]}
    assert len(server.gets()) == 1 and server.bytes_sent == served["size"]
    assert any("waiting for another download of MiDaS_small" in err for _, err in outputs)
    with sqlite3.connect(file_db) as db:
        assert db.execute("select count(*) from models_registry_weightfile").fetchone() == (1,)
        assert db.execute("select status from models_registry_weightdownload").fetchall() == [("succeeded",)]


@pytest.mark.slow
def test_killed_download_leaves_no_final_file_and_the_next_one_resumes(file_db, tmp_path, server, served,
                                                                       settings, small_model):
    server.configure(rate=10 * MB)
    cache = tmp_path / "cache"
    part = cache / "MiDaS_small" / f"{FILE_NAME}.part"
    process = subprocess.Popen(_download_command(), cwd=REPO, env=_subprocess_env(file_db, cache, server.url),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while (not part.exists() or part.stat().st_size < 8 * MB) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    process.stderr.close()

    kept = part.stat().st_size
    assert 8 * MB <= kept < served["size"]
    assert not (cache / "MiDaS_small" / FILE_NAME).exists()
    assert part.with_name(part.name + ".json").exists()
    with sqlite3.connect(file_db) as db:
        assert db.execute("select count(*) from models_registry_weightfile").fetchone() == (0,)

    # The next download (this process, same cache): the dead holder's lock is free, the partial is resumed.
    settings.DEPTHSITE_CACHE_DIR = cache
    settings.DEPTHSITE_MODEL_MIRROR = server.url
    server.configure()
    result = weight_download(model=small_model)

    assert not result.waited and result.resumed_from == kept
    last = server.gets()[-1]
    assert last.status == 206 and last.range == f"bytes={kept}-"
    assert result.weight_file.sha256 == served["sha256"]
    assert sorted(p.name for p in (cache / "MiDaS_small").iterdir()) == [FILE_NAME]


# --- hostile servers: byte caps, encodings, rejected bytes, the task's own timeout -------------------


def test_a_body_without_content_length_still_downloads(small_model, mirror, served):
    mirror.configure(length=False)
    result = weight_download(model=small_model)
    assert result.weight_file.sha256 == served["sha256"] and result.bytes_transferred == served["size"]


def test_an_endless_body_is_cut_at_the_pinned_size(small_model, mirror, served):
    small_model.expected_size = served["size"]
    small_model.save()
    mirror.configure(endless=True)

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    assert caught.value.extra["kind"] == "too_large" and caught.value.extra["limit"] == served["size"]
    assert "the pinned size" in caught.value.message
    assert _leftovers() == [] and not WeightFile.objects.exists()
    assert len(mirror.gets()) == 1  # not retried: more bytes will not make it fit


def test_an_endless_body_is_cut_at_the_catalogue_size_when_nothing_is_pinned(small_model, mirror, served,
                                                                             monkeypatch):
    monkeypatch.setattr(transfer, "SIZE_MARGIN_RATIO", 0.0)
    monkeypatch.setattr(transfer, "SIZE_MARGIN_BYTES", 2 * MB)
    mirror.configure(endless=True)

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    cap = caught.value.extra["limit"]
    assert served["size"] < cap <= served["size"] + 3 * MB
    assert "sent more than" in caught.value.message
    _assert_nothing_cached(small_model)


def test_a_declared_length_beyond_the_cap_is_refused_before_a_byte_is_written(small_model, mirror):
    mirror.configure(endless=True, declared_length=50 * 1000**3)

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    assert "declares 50.00 GB" in caught.value.message
    _assert_nothing_cached(small_model)


def test_entries_without_a_catalogue_size_are_capped_by_the_import_limit(small_model, mirror, settings):
    from models_registry.models import RegisteredModel

    RegisteredModel.objects.filter(pk=small_model.pk).update(architecture="custom_arch")
    small_model.refresh_from_db()
    settings.DEPTHSITE_MAX_IMPORT_BYTES = 4 * MB
    mirror.configure(length=False)

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    assert caught.value.extra["limit"] == 4 * MB and "DEPTHSITE_MAX_IMPORT_BYTES" in caught.value.message
    assert _leftovers() == []


@pytest.mark.slow
def test_a_gzip_encoded_body_is_refused_not_decoded(small_model, mirror):
    mirror.configure(gzip=True)

    with pytest.raises(DownloadError) as caught:
        weight_download(model=small_model)

    assert caught.value.extra["kind"] == "encoded" and "Content-Encoding gzip" in caught.value.message
    _assert_nothing_cached(small_model)


def _bad_bytes(kind: str, served) -> bytes:
    if kind == "safetensors_header":  # an entry without data_offsets
        header = json.dumps({"pretrained.layer1.0.weight": {"dtype": "F32", "shape": [1]}}).encode()
        return len(header).to_bytes(8, "little") + header + b"\0" * 4
    if kind == "lfs_pointer":
        return (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + served["sha256"].encode()
                + f"\nsize {served['size']}\n".encode())
    if kind == "html":
        return b"<!DOCTYPE html><html><body>rate limited</body></html>\n"
    return served["path"].read_bytes()  # "wrong_hash": good weights, but not the pinned ones


@pytest.mark.parametrize("kind", ["safetensors_header", "lfs_pointer", "html", "wrong_hash"])
def test_bytes_that_fail_acceptance_are_discarded_never_resumed(small_model, settings, served, tmp_path, kind):
    root = tmp_path / "hostile"
    root.mkdir()
    (root / FILE_NAME).write_bytes(_bad_bytes(kind, served))
    if kind == "wrong_hash":
        model_pin(model=small_model, sha256="cd" * 32, source="operator")
    with WeightServer(root) as hostile:
        settings.DEPTHSITE_MODEL_MIRROR = hostile.url
        with pytest.raises(Exception):
            weight_download(model=small_model)
        assert _leftovers() == []  # no .part, no sidecar: nothing for the next download to resume

        # The next download starts from zero (no Range) and gets the good file.
        if kind == "wrong_hash":
            model_pin(model=small_model, reset=True)
        os.replace(_copy(served["path"], tmp_path), root / FILE_NAME)
        hostile.reset_counters()
        result = weight_download(model=small_model)
        assert [(r.status, r.range) for r in hostile.gets()] == [(200, None)]
        assert result.weight_file.sha256 == served["sha256"] and result.resumed_from == 0


def _copy(path: Path, folder: Path) -> Path:
    copy = folder / f"good-{path.name}"
    shutil.copyfile(path, copy)
    return copy


def test_the_download_task_is_queued_with_its_own_timeout(small_model, settings, monkeypatch,
                                                          django_capture_on_commit_callbacks):
    import django_q.tasks

    calls = []
    monkeypatch.setattr(django_q.tasks, "async_task", lambda *args, **kwargs: calls.append((args, kwargs)) or "t1")
    settings.DEPTHSITE_DOWNLOAD_TIMEOUT = 12345
    with django_capture_on_commit_callbacks(execute=True):
        download = download_enqueue(model=small_model)

    (args, kwargs), = calls
    assert args == ("models_registry.tasks.download_run", download.pk)
    assert kwargs["timeout"] == 12345 and kwargs["group"] == "downloads"
    # The default fits the largest file (1.4 GB) on a 5 Mbit/s link, which no depth job's timeout does.
    from depthsite import env
    assert env.DOWNLOAD_TIMEOUT > 1.4e9 * 8 / 5e6 > env.JOB_TIMEOUT


def test_a_redelivered_download_task_leaves_the_running_transfer_alone(small_model, monkeypatch):
    from models_registry.tasks import download_run

    monkeypatch.setattr(download_service, "LOCK_WAIT_SECONDS", 1)
    row = WeightDownload.objects.create(model=small_model, node="test-node", status=RunStatus.RUNNING)
    with cachefs.locked("MiDaS_small"):  # the first delivery, still transferring
        assert download_run(row.pk) == "running elsewhere"
    row.refresh_from_db()
    assert row.status == RunStatus.RUNNING and row.error == ""
