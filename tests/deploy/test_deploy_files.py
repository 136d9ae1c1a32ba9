"""deploy/ and docs/deploy.md agree: per role the same variables (all read by depthsite/env.py) and commands."""
from __future__ import annotations

import re

import pytest

from tests.deploy.layout import (DJANGO_OWN, ENV_DIR, ROOT, SECRETS, compose_command, compose_env_names,
                                 compose_services, env_py_names, read_env_file, read_unit, unit_env_names)

WORKERS = ("worker-1", "worker-2")


def _documented_roles() -> dict[str, set[str]]:
    """docs/deploy.md: under each '### Environment: <role>' heading, a table naming the variables in column one."""
    roles, role = {}, None
    for line in (ROOT / "docs" / "deploy.md").read_text().splitlines():
        heading = re.match(r"### Environment: (\w+)", line)
        if heading:
            role = heading.group(1)
            roles[role] = set()
        elif line.startswith("#"):
            role = None
        elif role and line.startswith("| `"):
            roles[role].add(re.match(r"\| `([A-Z0-9_]+)`", line).group(1))
    return roles


def _roles() -> dict[str, dict[str, set[str]]]:
    services = compose_services()
    return {
        "web": {"compose": compose_env_names(services["web"]),
                "systemd": unit_env_names(read_unit("depthsite-web.service"))},
        "worker": {**{f"compose {name}": compose_env_names(services[name]) for name in WORKERS},
                   "systemd": unit_env_names(read_unit("depthsite-worker@.service"))},
    }


def test_env_py_names_are_found():
    """The parser sees env.py's reads (so an empty set cannot make the subset checks below pass vacuously)."""
    names = env_py_names()
    expected = {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "DEPTHSITE_NODE", "DJANGO_SECURE_PROXY_SSL_HEADER"}
    assert expected <= names


@pytest.mark.parametrize("role", ["web", "worker"])
def test_compose_units_and_docs_set_the_same_variables_for_each_role(role):
    sources = _roles()[role]
    sources["docs/deploy.md"] = _documented_roles()[role]
    reference = sources["systemd"]
    for source, names in sources.items():
        assert names == reference, f"{role}: {source} differs from the systemd unit: " \
                                   f"extra {sorted(names - reference)}, missing {sorted(reference - names)}"


@pytest.mark.parametrize("role", ["web", "worker"])
def test_every_variable_a_role_sets_is_read_by_env_py(role):
    known = env_py_names() | DJANGO_OWN
    for source, names in _roles()[role].items():
        assert names - known == set(), f"{role}/{source} sets variables nothing reads: {sorted(names - known)}"


def test_each_role_sets_what_a_machine_of_its_kind_needs():
    roles = _roles()
    needed = {"DJANGO_SETTINGS_MODULE", "DJANGO_DEBUG", "REDIS_URL", "DEPTHSITE_QUEUE_NAME", "DEPTHSITE_MEDIA_ROOT",
              "DEPTHSITE_NODE", "DEPTHSITE_CACHE_DIR"} | SECRETS
    assert needed | {"DJANGO_ALLOWED_HOSTS", "DJANGO_SECURE_PROXY_SSL_HEADER"} <= roles["web"]["systemd"]
    assert needed | {"DEPTHSITE_DEVICE", "DEPTHSITE_WORKERS"} <= roles["worker"]["systemd"]
    common = read_env_file(ENV_DIR / "common.env")
    assert common["DJANGO_SETTINGS_MODULE"] == "depthsite.settings.production" and common["DJANGO_DEBUG"] == "0"
    # Secrets are never committed: compose interpolates them, systemd reads an operator's file.
    assert SECRETS.isdisjoint(set(common) | set(read_env_file(ENV_DIR / "web.env"))
                              | set(read_env_file(ENV_DIR / "worker.env")))
    assert read_env_file(ENV_DIR / "secrets.env.example")["DJANGO_SECRET_KEY"] == ""


def test_nodes_are_distinct_with_caches_of_their_own():
    services = compose_services()
    nodes = {services[name]["environment"]["DEPTHSITE_NODE"] for name in WORKERS}
    assert len(nodes) == len(WORKERS)
    cache_dir = read_env_file(ENV_DIR / "worker.env")["DEPTHSITE_CACHE_DIR"]
    volumes = [next(v.split(":")[0] for v in services[name]["volumes"] if cache_dir.startswith(v.split(":")[1]))
               for name in WORKERS]
    assert len(set(volumes)) == len(WORKERS), volumes
    unit = read_unit("depthsite-worker@.service")
    assert "DEPTHSITE_NODE=%H" in unit["Environment"] and "DEPTHSITE_DEVICE=%i" in unit["Environment"]


def test_compose_and_units_run_the_same_commands():
    services = compose_services()
    web_unit, worker_unit = read_unit("depthsite-web.service"), read_unit("depthsite-worker@.service")
    assert web_unit["ExecStartPre"] == ["/opt/depthsite/scripts/serve.sh release"]
    assert web_unit["ExecStart"] == ["/opt/depthsite/scripts/serve.sh web"]
    assert worker_unit["ExecStart"] == ["/opt/depthsite/scripts/serve.sh worker"]
    assert compose_command(services["web"]) == \
        "sh -c scripts/serve.sh release && exec scripts/serve.sh web --bind 0.0.0.0:8000"
    for name in WORKERS:
        assert compose_command(services[name]) == "scripts/serve.sh worker"
