"""A measuring aid for bench/scale.py: count every SQL statement a process sends, when DEPTHSITE_COUNT_QUERIES_DIR is set.

Each process (web, qcluster, each forked worker) keeps its totals (all, and per verb and table) in
`<dir>/<role>-<pid>.count`, rewritten in place at every statement, so the bench reads exact totals from live processes. Off by default: nothing is
installed unless the setting names a folder.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_state = {"pid": None, "fd": None, "count": 0, "kinds": {}}
_folder: Path | None = None


def _role() -> str:
    argv = " ".join(sys.argv[:2])
    if "qcluster" in argv:
        return "cluster"
    if "runserver" in argv or "gunicorn" in argv:
        return "web"
    return "other"


_TABLE = re.compile(r'\b(?:FROM|INTO|UPDATE)\s+"?([A-Za-z0-9_]+)"?', re.IGNORECASE)


def _kind(sql: str) -> str:
    """"SELECT inference_depthjob", "UPDATE inference_depthjob", "SAVEPOINT": what a statement does, to what."""
    verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "?"
    table = _TABLE.search(sql)
    return f"{verb} {table.group(1)}" if table and verb in ("SELECT", "INSERT", "UPDATE", "DELETE") else verb


def _count(execute, sql, params, many, context):
    with _lock:
        if _state["pid"] != os.getpid():  # a forked worker starts its own total, in its own file
            _state.update(pid=os.getpid(), count=0, kinds={},
                          fd=os.open(_folder / f"{_role()}-{os.getpid()}.count", os.O_WRONLY | os.O_CREAT, 0o644))
        _state["count"] += 1
        kind = _kind(sql)
        _state["kinds"][kind] = _state["kinds"].get(kind, 0) + 1
        text = json.dumps({"total": _state["count"], "kinds": _state["kinds"]}).encode()
        os.pwrite(_state["fd"], text, 0)
        os.ftruncate(_state["fd"], len(text))
    return execute(sql, params, many, context)


def _on_connection(sender, connection, **kwargs):
    if _count not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count)


def queries_count_install(*, folder: str | Path) -> None:
    """Count the statements of every database connection this process opens from now on."""
    from django.db.backends.signals import connection_created

    global _folder
    _folder = Path(folder)
    _folder.mkdir(parents=True, exist_ok=True)
    connection_created.connect(_on_connection, dispatch_uid="depthsite.querycount")


def queries_counted(*, folder: str | Path) -> dict[str, int]:
    """{role: statements, "<role> <kind>": statements} summed over the processes that wrote into `folder`."""
    totals: dict[str, int] = {}
    for path in Path(folder).glob("*.count"):
        role = path.name.split("-", 1)[0]
        try:
            data = json.loads(path.read_text() or "{}")
        except ValueError:  # caught between the write and the truncation of a shorter text: never the case
            continue        # here, since a total only grows, but a reader must not fail the bench
        totals[role] = totals.get(role, 0) + int(data.get("total", 0))
        for kind, count in data.get("kinds", {}).items():
            key = f"{role} {kind}"
            totals[key] = totals.get(key, 0) + count
    return totals
