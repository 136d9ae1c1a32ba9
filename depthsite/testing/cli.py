"""Run `manage.py` in a real subprocess against an isolated SQLite file, cache folder and node name."""
from __future__ import annotations

import os
import subprocess
import sys
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


def make_site(root: Path, **extra_env: str) -> Site:
    """Create the folders and migrate the database (which also seeds the catalogue)."""
    root.mkdir(parents=True, exist_ok=True)
    site = Site(root=root, extra_env=extra_env)
    result = site.manage("migrate", "--noinput", "-v0")
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed: {result.stderr}")
    return site
