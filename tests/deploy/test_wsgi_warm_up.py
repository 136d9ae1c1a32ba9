"""A web process answers its first request warm: the WSGI module does the URLconf's imports when it loads."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from depthsite.testing.cli import PROJECT_ROOT, Site

SCRIPT = r"""
import json, sys
import depthsite.wsgi
from django.db import connections
from django.urls import get_resolver
from inference.services import jobs
print(json.dumps({
    "resolved": "url_patterns" in get_resolver().__dict__,
    "views": [name for name in ("inference.views", "inference.api.views", "models_registry.api.views")
              if name in sys.modules],
    "broker_clients": len(jobs._brokers),
    "orm_broker_loaded": "django_q.brokers.orm" in sys.modules,
    "connections": [alias for alias in connections if connections[alias].connection is not None],
    "heavy": sorted(name for name in ("torch", "timm", "torchvision", "onnxruntime") if name in sys.modules),
}))
"""
VIEWS = ["inference.views", "inference.api.views", "models_registry.api.views"]


@pytest.mark.slow
@pytest.mark.parametrize(("database", "redis", "clients"), [
    ("", "", 0),  # the site's SQLite file and the ORM broker, as `make run`
    ("postgres://postgres@127.0.0.1:9/none", "", 0),  # a database that is down: the ORM broker is not made
    ("", "redis://127.0.0.1:9/0", 1),  # Redis down: its client is made, and connects on first use only
], ids=["orm", "database-down", "redis-down"])
def test_loading_the_wsgi_module_imports_the_views_and_opens_nothing(tmp_path, database, redis, clients):
    # A cold gunicorn worker's first upload took 0.12-0.5 s against 35 ms warm (docs/performance.md): Django
    # resolves the URLconf, importing every view, on the first request. The module loads before gunicorn forks
    # where preload_app is set, and a server that is down must not hold up the start.
    site = Site(root=tmp_path, extra_env={"REDIS_URL": redis, **({"DATABASE_URL": database} if database else {})})
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, env=site.env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warming the web process failed" not in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"resolved": True, "views": VIEWS, "broker_clients": clients,
                      "orm_broker_loaded": not redis, "connections": [], "heavy": []}


def test_a_failing_warm_up_is_logged_and_the_module_still_serves(monkeypatch, caplog):
    import django.urls

    import depthsite.wsgi

    def broken():
        raise ImportError("a view module that does not import")

    monkeypatch.setattr(django.urls, "get_resolver", broken)
    logger = logging.getLogger("depthsite.wsgi")  # the site's LOGGING may stop it short of the root's handler
    logger.addHandler(caplog.handler)
    try:
        assert depthsite.wsgi.warm_up_or_log() is False
    finally:
        logger.removeHandler(caplog.handler)
    assert "warming the web process failed" in caplog.text and "does not import" in caplog.text
    assert callable(depthsite.wsgi.application)
