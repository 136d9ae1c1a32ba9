"""`manage.py check --deploy` is clean under the production settings with the documented web environment."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.deploy.layout import ROOT, production_environ

PY = sys.executable


def _check(environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_check_deploy_is_clean_with_the_production_settings(tmp_path):
    result = _check(production_environ(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_the_base_settings_with_the_same_environment_are_not_deployable(tmp_path):
    """The production module is what makes the check pass: the general settings, debug off, still warn."""
    result = _check(production_environ(tmp_path, DJANGO_SETTINGS_MODULE="depthsite.settings"))
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ({"DJANGO_DEBUG": "1"}, "needs DJANGO_DEBUG=0"),
    ({"DJANGO_SECRET_KEY": ""}, "DJANGO_SECRET_KEY must be set"),
    ({"DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto: https"}, "is not an HTTP header name"),
    ({"DJANGO_SECURE_HSTS_SECONDS": "-1"}, "must be 0 (off) or more"),
    ({"DJANGO_SECURE_SSL_REDIRECT": "maybe"}, "is not a boolean"),
])
def test_a_misconfigured_production_environment_stops_with_a_clear_message(tmp_path, overrides, message):
    result = _check(production_environ(tmp_path, **overrides))
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.slow
def test_weakened_security_settings_are_reported_by_the_check(tmp_path):
    """The env switches really reach the settings: turning them off makes `check --deploy` warn again."""
    result = _check(production_environ(tmp_path, DJANGO_SECURE_SSL_REDIRECT="0", DJANGO_SECURE_COOKIES="0",
                                       DJANGO_SECURE_HSTS_SECONDS="0"))
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr
