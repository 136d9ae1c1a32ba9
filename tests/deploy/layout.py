"""Reads the deployment files as data: env.py's variable names, the env files, compose services and systemd units."""
from __future__ import annotations

import ast
import os
import re
import secrets
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENV_DIR = DEPLOY / "env"
# Read by Django itself (manage.py, wsgi.py), not by depthsite/env.py; the only other name a role may set.
DJANGO_OWN = {"DJANGO_SETTINGS_MODULE"}
# Operator-provided, never committed: compose interpolates them from deploy/.env, systemd reads secrets.env.
SECRETS = {"DJANGO_SECRET_KEY", "DATABASE_URL"}


def env_py_names() -> set[str]:
    """Every variable name depthsite/env.py reads: the first argument of each get_*() call and os.environ use."""
    tree = ast.parse((ROOT / "depthsite" / "env.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("get_")
                and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, comments and blank lines skipped (systemd EnvironmentFile and compose env_file)."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise AssertionError(f"{path.name}:{number}: not a KEY=VALUE line: {line!r}")
        if key in values:
            raise AssertionError(f"{path.name}:{number}: {key} is set twice")
        values[key] = value
    return values


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def compose_env_names(service: dict) -> set[str]:
    names = set()
    for env_file in service.get("env_file", []):
        names |= set(read_env_file(DEPLOY / env_file))
    environment = service.get("environment", {})
    names |= set(environment) if isinstance(environment, dict) else {item.split("=", 1)[0] for item in environment}
    return names


def compose_command(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def read_unit(name: str) -> dict[str, list[str]]:
    """The [Service] section of a unit: each key with every value it is given (EnvironmentFile repeats)."""
    section, values = None, {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def unit_env_names(unit: dict[str, list[str]]) -> set[str]:
    """Names from the unit's EnvironmentFile=/etc/depthsite/X (shipped as deploy/env/X, secrets as an example)."""
    names = set()
    for path in unit.get("EnvironmentFile", []):
        shipped = ENV_DIR / Path(path.lstrip("-")).name
        if not shipped.exists():
            shipped = shipped.with_name(shipped.name + ".example")
        names |= set(read_env_file(shipped))
    names |= {value.split("=", 1)[0] for value in unit.get("Environment", [])}
    return names


def production_environ(tmp_path: Path, role: str = "web", **overrides: str) -> dict[str, str]:
    """The documented environment of a role, made local: a temp SQLite database and folders, no Redis, a fresh key.

    Nothing of the caller's DJANGO_*/DEPTHSITE_* environment leaks in, so the files alone decide the settings.
    """
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith(("DJANGO_", "DEPTHSITE_")) and key not in ("DATABASE_URL", "REDIS_URL")}
    for name in ("common.env", f"{role}.env"):
        environ.update(read_env_file(ENV_DIR / name))
    environ.pop("REDIS_URL", None)
    environ.update(
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DATABASE_URL=f"sqlite:///{tmp_path / 'depthsite.sqlite3'}",
        DEPTHSITE_VAR_DIR=str(tmp_path / "var"),
        DEPTHSITE_MEDIA_ROOT=str(tmp_path / "media"),
        DEPTHSITE_CACHE_DIR=str(tmp_path / "cache"),
        DEPTHSITE_MODEL_MIRROR="",
        OMP_NUM_THREADS="1",
    )
    environ.update(overrides)
    return environ
