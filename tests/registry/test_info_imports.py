"""`manage.py models info|list` answer without torch and with almost nothing past Django's own start-up.

The import count is the stable measure of a command's start-up cost (wall-clock figures are bench/load.py's).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from depthsite.testing.cli import PROJECT_ROOT, make_site

SCRIPT = r"""
import io, json, sys
import django
django.setup()
from django.core.management import call_command, get_commands
get_commands()  # what `manage.py version` or any command pays before it runs
before = set(sys.modules)
call_command(*sys.argv[1:], stdout=io.StringIO())
added = sorted(set(sys.modules) - before)
print(json.dumps({"added": added, "heavy": [m for m in ("torch", "timm", "torchvision") if m in sys.modules]}))
"""
MAX_ADDED_MODULES = 25  # today 5: the command module and the registry's selectors and formatting


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("site"))


@pytest.mark.slow
@pytest.mark.parametrize("args", [["models", "info"], ["models", "info", "--json"], ["models", "list"]])
def test_info_and_list_import_no_torch_and_little_else(site, args):
    result = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=PROJECT_ROOT, env=site.env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert len(report["added"]) <= MAX_ADDED_MODULES, report["added"]
