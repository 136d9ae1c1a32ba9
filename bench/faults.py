"""Reliability suite: bounded fault and load scenarios against real depthsite processes on 127.0.0.1, as one table.

    .venv/bin/python bench/faults.py [--only NAME ...] [--quick] [--json] [--keep] [--soak-clients N --soak-minutes M]

Every figure is counted or timed in this run (server request logs, files on disk, database rows, HTTP
statuses, process exit codes); nothing is a constant. Each scenario works in a throwaway folder (SQLite
file, weight cache, media), every loop is bounded in count and time, and every server or worker it starts
is killed when the bench ends, also on Ctrl-C. The exit code is 1 when any scenario's verdict is FAIL.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.faultlib import common  # noqa: E402
from bench.faultlib.common import FAIL, Result, Workspace  # noqa: E402


# name: (module in bench.faultlib, function, what it does)
SCENARIOS = {
    "kill-download": ("downloads", "kill_mid_download", "kill -9 mid-download, then resume"),
    "concurrent-download": ("downloads", "concurrent_downloads", "processes x models downloading at once"),
    "bad-weights": ("badfiles", "bad_weight_files", "damaged and hostile weight files through import/verify"),
    "worker-kill": ("jobs", "worker_kill", "SIGKILL of the worker mid-job"),
    "qcluster-restart": ("jobs", "qcluster_restart", "qcluster stopped and restarted with jobs queued"),
    "postgres-restart": ("jobs", "postgres_restart", "a private PostgreSQL restarted under load"),
    "disk-full": ("diskfull", "disk_full", "disk full during convert / export / import"),
    "bad-requests": ("payloads", "bad_requests", "bad uploads and API payloads"),
    "soak": ("soak", "soak", "clients uploading and polling for minutes"),
}


def _function(name: str):
    module, function, _ = SCENARIOS[name]
    return getattr(importlib.import_module(f"bench.faultlib.{module}"), function)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if value is None:
        return "-"
    return str(value)


def render_table(results: list[Result]) -> str:
    """The table (scenario, runs, figures, verdict, time), then each scenario's notes below it."""
    rows = [("scenario", "runs", "figures", "verdict", "time")]
    for result in results:
        figures = ", ".join(f"{key} {_cell(value)}" for key, value in result.figures.items())
        rows.append((result.scenario, str(result.runs), figures or "-", result.verdict, f"{result.seconds:.0f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    notes = [f"- {result.scenario}: {note}" for result in results for note in result.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    scenarios = SCENARIOS
    parser = argparse.ArgumentParser(prog="bench/faults.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"run only these scenarios (repeat or comma-separate): {', '.join(scenarios)}")
    parser.add_argument("--quick", action="store_true", help="reduced counts (for development and the test)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (for inspection)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--soak-clients", type=int, default=4, help="concurrent soak clients (default 4)")
    parser.add_argument("--soak-minutes", type=float, default=1.0, help="soak duration (default 1 minute)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, _, text) in scenarios.items():
            print(f"{name:<20} {text}")
        return 0
    chosen = list(scenarios)
    if args.only:
        chosen = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in scenarios]
        if unknown:
            parser.exit(2, f"error: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(scenarios)}\n")
    if not 1 <= args.soak_clients <= 64 or not 0 < args.soak_minutes <= 60:
        parser.exit(2, "error: --soak-clients must be 1..64 and --soak-minutes in (0, 60]\n")

    common.install_handlers()
    root = Path(tempfile.mkdtemp(prefix="depthsite-faults-"))
    if not args.keep:
        common.on_exit(lambda: shutil.rmtree(root, ignore_errors=True))
    workspace = Workspace(root, quick=args.quick)
    workspace.soak_clients, workspace.soak_minutes = args.soak_clients, args.soak_minutes
    results: list[Result] = []
    started = time.monotonic()
    for name in chosen:
        if not args.json:
            print(f"[{time.monotonic() - started:6.0f} s] {name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            result = _function(name)(workspace)
        except Exception as exc:  # a scenario that breaks is a FAIL row, and the others still run
            result = Result(name, verdict=FAIL, notes=[f"the scenario itself failed: {type(exc).__name__}: {exc}"])
            traceback.print_exc(file=sys.stderr)
        result.scenario = name
        result.seconds = time.monotonic() - began
        results.append(result)
    common.cleanup_all()
    total = time.monotonic() - started
    if args.json:
        print(json.dumps({"quick": args.quick, "seconds": round(total, 1), "results": [r.as_dict() for r in results],
                          "failed": [r.scenario for r in results if r.verdict == FAIL]}, indent=2))
    else:
        print(render_table(results))
        print(f"\n{len(results)} scenario(s) in {total:.0f} s{' (--quick)' if args.quick else ''}; "
              f"scratch folder {'kept at ' + str(root) if args.keep else 'removed'}")
    return 1 if any(r.verdict == FAIL for r in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
