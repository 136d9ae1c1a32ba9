"""Safe defaults: DEBUG is off unless asked for, and a site without DEBUG needs a real secret key."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _manage(tmp_path: Path, *args: str, **env_values: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEPTHSITE_", "DJANGO_"))}
    env.update({"DJANGO_SETTINGS_MODULE": "depthsite.settings", "DEPTHSITE_VAR_DIR": str(tmp_path / "var"),
                "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", **env_values})
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "manage.py"), *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _printed(tmp_path: Path, probe: str, **env_values: str) -> list[str]:
    """The lines `manage.py shell -c probe` printed with a secret key set (it must succeed)."""
    result = _manage(tmp_path, "shell", "-c", probe, DJANGO_SECRET_KEY="k", **env_values)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_debug_is_off_without_the_variable_and_then_a_key_is_required(tmp_path):
    probe = "from django.conf import settings; print('DEBUG', settings.DEBUG)"
    result = _manage(tmp_path, "shell", "-c", probe)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off" in result.stderr
    assert not (tmp_path / "var" / "secret_key").exists()

    with_key = _manage(tmp_path, "shell", "-c", probe, DJANGO_SECRET_KEY="a-key-from-the-operator")
    assert with_key.returncode == 0, with_key.stderr
    assert "DEBUG False" in with_key.stdout


def test_a_debug_run_keeps_a_private_key_that_later_commands_reuse(tmp_path):
    probe = "from django.conf import settings; print('DEBUG', settings.DEBUG, 'KEY', settings.SECRET_KEY)"
    local = _manage(tmp_path, "shell", "-c", probe, DJANGO_DEBUG="1")
    assert local.returncode == 0, local.stderr
    key_file = tmp_path / "var" / "secret_key"
    key = key_file.read_text().strip()
    assert len(key) >= 50 and f"DEBUG True KEY {key}" in local.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not [p.name for p in key_file.parent.iterdir() if p.name != "secret_key"]  # no temporary left

    # createsuperuser and friends beside `make run`: debug off, the same key.
    later = _manage(tmp_path, "shell", "-c", probe)
    assert later.returncode == 0, later.stderr
    assert f"DEBUG False KEY {key}" in later.stdout


def test_media_storage_is_the_local_folder_by_default_and_s3_by_one_setting(tmp_path):
    probe = ("from django.conf import settings; d = settings.STORAGES['default']; "
             "print('BACKEND', d['BACKEND']); print('OPTIONS', sorted(d.get('OPTIONS', {}).items()))")
    assert "BACKEND django.core.files.storage.FileSystemStorage" in _printed(tmp_path, probe)

    lines = _printed(tmp_path, probe, DEPTHSITE_MEDIA_STORAGE="s3", DEPTHSITE_MEDIA_S3_BUCKET="media",
                     DEPTHSITE_MEDIA_S3_ENDPOINT="http://127.0.0.1:9000", DEPTHSITE_MEDIA_S3_PREFIX="/site/")
    options = next(line for line in lines if line.startswith("OPTIONS "))
    assert "BACKEND storages.backends.s3.S3Storage" in lines
    for item in ("('bucket_name', 'media')", "('endpoint_url', 'http://127.0.0.1:9000')", "('location', 'site')",
                 "('file_overwrite', True)", "('default_acl', None)"):
        assert item in options

    missing = _manage(tmp_path, "shell", "-c", probe, DJANGO_SECRET_KEY="k", DEPTHSITE_MEDIA_STORAGE="s3")
    assert missing.returncode != 0 and "DEPTHSITE_MEDIA_S3_BUCKET" in missing.stderr
    unknown = _manage(tmp_path, "shell", "-c", probe, DJANGO_SECRET_KEY="k", DEPTHSITE_MEDIA_STORAGE="ftp")
    assert unknown.returncode != 0 and "use local or s3" in unknown.stderr


def test_processes_keep_their_database_connection_unless_told_not_to(tmp_path):
    # A worker used to reconnect before every job and the web server for every request (CONN_MAX_AGE 0).
    probe = ("from django.conf import settings; d = settings.DATABASES['default']; "
             "print('KEEP', d['CONN_MAX_AGE'], d['CONN_HEALTH_CHECKS'])")
    assert "KEEP 60 True" in _printed(tmp_path, probe)
    for value, expected in (("0", "KEEP 0 True"), ("5m", "KEEP 300 True")):
        assert expected in _printed(tmp_path, probe, DATABASE_CONN_MAX_AGE=value)
    wrong = _manage(tmp_path, "shell", "-c", probe, DJANGO_SECRET_KEY="k", DATABASE_CONN_MAX_AGE="forever")
    assert wrong.returncode != 0
    assert "DATABASE_CONN_MAX_AGE='forever' is not a duration" in wrong.stderr


def test_the_query_counter_counts_statements_per_kind_in_its_own_file(tmp_path):
    from depthsite import querycount

    querycount._folder = tmp_path
    querycount._state.update(pid=None)
    calls = []
    for sql in ('SELECT "a"."id" FROM "inference_depthjob" WHERE 1', 'UPDATE "inference_depthjob" SET x = 1',
                'SELECT 1 FROM "inference_depthjob"', "SAVEPOINT s1"):
        querycount._count(lambda *args: calls.append(args), sql, None, False, {})
    counted = querycount.queries_counted(folder=tmp_path)
    assert len(calls) == 4  # every statement still ran
    assert counted == {"other": 4, "other SELECT inference_depthjob": 2, "other UPDATE inference_depthjob": 1,
                       "other SAVEPOINT": 1}
    os.close(querycount._state["fd"])
    querycount._state.update(pid=None)
