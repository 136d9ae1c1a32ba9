"""Run `manage.py` in a real subprocess against an isolated SQLite file, cache folder and node name."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Site:
    """An isolated depthsite installation for subprocess tests."""

    root: Path
    extra_env: dict

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("DEPTHSITE_", "DJANGO_"))}
        env.update({
            "DJANGO_SETTINGS_MODULE": "depthsite.settings",
            "DJANGO_SECRET_KEY": "tests-only",  # DEBUG is off by default, and then a key is required
            "DATABASE_URL": f"sqlite:///{self.root / 'db.sqlite3'}",
            "DEPTHSITE_VAR_DIR": str(self.root / "var"),
            "DEPTHSITE_CACHE_DIR": str(self.cache_dir),
            "DEPTHSITE_MEDIA_ROOT": str(self.root / "media"),
            "DEPTHSITE_NODE": "test-node",
            # The caller's share of the cores (tests/conftest.py gives each xdist worker its own), else two.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or "2",
            "DEPTHSITE_TORCH_THREADS": os.environ.get("DEPTHSITE_TORCH_THREADS") or "0",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def manage(self, *args: str, timeout: float = 300, stdin: str | None = None,
               **env_overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "manage.py"), *args],
            cwd=PROJECT_ROOT, env=self.env(**env_overrides), capture_output=True, text=True,
            timeout=timeout, input=stdin,
        )


# Migrated SQLite databases of this process, by the sites' own environment: a copy is a new site's database.
_MIGRATED: dict[tuple[tuple[str, str], ...], Path] = {}


@functools.cache
def _migrated_folder() -> Path:
    """This process's folder of migrated databases, removed when it exits."""
    folder = Path(tempfile.mkdtemp(prefix="depthsite-migrated-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _migrated_copy(database: Path) -> Path:
    copy = _migrated_folder() / f"db-{len(_MIGRATED)}.sqlite3"
    shutil.copyfile(database, copy)
    return copy


def make_site(root: Path, **extra_env: str) -> Site:
    """Create the folders and migrate the database (which also seeds the catalogue).

    A site on its own SQLite file (no DATABASE_URL given) is migrated once per process and environment; the next
    gets a copy of that file, as migrated and seeded, before anything ran on it (`migrate` is a 2-3 s process)."""
    root.mkdir(parents=True, exist_ok=True)
    site = Site(root=root, extra_env=extra_env)
    database = root / "db.sqlite3"
    key = tuple(sorted(extra_env.items())) if "DATABASE_URL" not in extra_env else None
    migrated = _MIGRATED.get(key) if key is not None else None
    fresh = not database.exists()
    if migrated is not None and fresh:
        shutil.copyfile(migrated, database)
        return site
    result = site.manage("migrate", "--noinput", "-v0")
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed: {result.stderr}")
    # Kept only from a database `migrate` made (not one that held rows already), and when it left every write in
    # the file itself (its last connection closed the write-ahead log).
    if fresh and key is not None and key not in _MIGRATED and not database.with_name(database.name + "-wal").exists():
        _MIGRATED[key] = _migrated_copy(database)
    return site
