"""A web process answers its first request warm: the WSGI module does the URLconf's imports when it loads."""
from __future__ import annotations

import json
import subprocess
import sys

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
    "broker": len(jobs._brokers),
    "connections": [alias for alias in connections if connections[alias].connection is not None],
    "heavy": sorted(name for name in ("torch", "timm", "torchvision", "onnxruntime") if name in sys.modules),
}))
"""


def test_loading_the_wsgi_module_imports_the_views_and_opens_no_connection(tmp_path):
    # A cold gunicorn worker's first upload took 0.12-0.5 s against 35 ms warm (docs/performance.md): Django
    # resolves the URLconf, importing every view, on the first request. No connection may be opened, since
    # with gunicorn's preload_app the module loads before the fork.
    site = Site(root=tmp_path, extra_env={})
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, env=site.env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"resolved": True, "views": ["inference.views", "inference.api.views",
                                                  "models_registry.api.views"],
                      "broker": 1, "connections": [], "heavy": []}


def test_the_web_process_still_loads_when_the_warm_up_cannot_reach_the_database(tmp_path):
    # The ORM broker's client reads the connection's autocommit state: with the database down, the warm-up
    # fails, and the server must start anyway (its requests then get the real error).
    site = Site(root=tmp_path, extra_env={"DATABASE_URL": "postgres://postgres@127.0.0.1:9/none"})
    result = subprocess.run([sys.executable, "-c", "import depthsite.wsgi; print('loaded')"], cwd=PROJECT_ROOT,
                            env=site.env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "loaded"
    assert "warming the web process failed" in result.stderr
