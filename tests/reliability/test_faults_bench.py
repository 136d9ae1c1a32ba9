"""bench/faults.py runs a real scenario end to end, and its JSON is consistent with the per-case records it holds."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from depthsite.testing.cli import PROJECT_ROOT

BENCH = PROJECT_ROOT / "bench" / "faults.py"


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_an_unknown_scenario_is_one_line_and_exit_2():
    done = _bench("--only", "no-such-scenario", "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "no-such-scenario" in done.stderr and "bad-requests" in done.stderr


@pytest.mark.slow
def test_bad_requests_quick_json_is_consistent():
    done = _bench("--only", "bad-requests", "--quick", "--json")
    report = json.loads(done.stdout)  # --json: stdout is the JSON alone
    assert report["quick"] is True and [r["scenario"] for r in report["results"]] == ["bad-requests"]
    (result,) = report["results"]
    assert set(result) >= {"scenario", "runs", "figures", "verdict", "notes", "details"}
    details, figures = result["details"], result["figures"]
    # --quick still sends requests of every area, each one recorded with its real status
    assert len(details) >= 10 and {d["area"] for d in details} >= {"predictions", "models", "form"}
    assert result["runs"] == figures["requests"] == len(details)
    server_errors = sum(1 for d in details if d["status"] >= 500 or d["status"] == 0)
    accepted = sum(1 for d in details if 200 <= d["status"] < 400)
    named = sum(1 for d in details if d["named"])
    unnamed = sum(1 for d in details if 400 <= d["status"] < 500 and not d["named"])
    assert figures["5xx"] == server_errors and figures["2xx/3xx (accepted)"] == accepted
    assert figures["4xx naming the problem"] == named and figures["4xx not naming it"] == unnamed
    assert server_errors + accepted + named + unnamed == len(details)
    assert all(not d["named"] or 400 <= d["status"] < 500 for d in details)
    # a request with no image at all is a plain 400 that says "image" on any version of the site
    first = next(d for d in details if d["case"] == "no image field")
    assert first["status"] == 400 and first["named"]
    # the verdict follows from the figures, and so does the exit code
    clean = server_errors == 0 and accepted == 0 and unnamed == 0
    assert result["verdict"] == ("pass" if clean else "FAIL")
    assert report["failed"] == ([] if clean else ["bad-requests"])
    assert done.returncode == (0 if clean else 1)
