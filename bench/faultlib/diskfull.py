"""Disk full: convert, export and import on small tmpfs mounts; each must fail cleanly and leave nothing behind.

The bench mounts two tmpfs (root only; the scenario is skipped where mount fails): the weight cache, sized
to hold the imported .pt plus a little, and an export folder smaller than any export. Every operation must
exit non-zero with a one-line error (no traceback), leave no new file on either mount (temporary or final
name), no database row for a file that is not there, and the cached file must still verify.
"""
from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

from bench.faultlib import common
from bench.faultlib.common import Result, Workspace, files_under, manage

MB = 1024 * 1024


def _mount(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return False
    common.on_exit(lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True))
    return True


def _rows(root: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(root / "db.sqlite3", timeout=30) as conn:
        return conn.execute("SELECT format, path FROM models_registry_weightfile").fetchall()


def disk_full(workspace: Workspace) -> Result:
    result = Result("disk-full")
    pt = workspace.checkpoint()
    size = pt.stat().st_size
    outside = workspace.folder("diskfull-inputs")
    site = workspace.site("disk-full")
    # Inputs made on the normal disk first: a safetensors file, and a bundle exported before the cache is full.
    st_file = workspace.checkpoint(fmt="safetensors")
    staging = workspace.site("disk-full-staging")
    if manage(staging, "models", "import", str(pt), "--model", "MiDaS_small").returncode != 0:
        raise RuntimeError("could not import the checkpoint into the staging site")
    bundle = outside / "midas_small.h5.tar"
    made = manage(staging, "models", "export", "--model", "MiDaS_small", "--format", "h5", "--bundle",
                  "--output", str(bundle))
    if made.returncode != 0:
        raise RuntimeError(f"could not make a bundle: {made.stderr[-300:]}")

    cache, exports = site.cache_dir, site.root / "exports"
    if site.cache_dir.exists():
        site.cache_dir.rmdir()
    if not (_mount(cache, size + 24 * MB) and _mount(exports, 16 * MB)):
        return result.skip("cannot mount tmpfs")
    if manage(site, "models", "import", str(pt), "--model", "MiDaS_small").returncode != 0:
        raise RuntimeError("could not import the checkpoint into the small cache")

    operations = [
        ("convert to h5", ("convert", "--model", "MiDaS_small", "--to", "h5")),
        ("convert to safetensors", ("convert", "--model", "MiDaS_small", "--to", "safetensors")),
        ("convert to pkl", ("convert", "--model", "MiDaS_small", "--to", "pkl")),
        ("export pt", ("export", "--model", "MiDaS_small", "--format", "pt", "--output", str(exports / "a.pt"))),
        ("export h5", ("export", "--model", "MiDaS_small", "--format", "h5", "--output", str(exports / "a.h5"))),
        ("export bundle", ("export", "--model", "MiDaS_small", "--format", "safetensors", "--bundle",
                           "--output", str(exports / "a.tar"))),
        ("import safetensors", ("import", str(st_file), "--model", "MiDaS_small")),
        ("import bundle", ("import", str(bundle))),
    ]
    if workspace.quick:
        operations = [operations[0], operations[3], operations[6]]
    details = []
    for label, args in operations:
        before = {**{f"cache/{k}": v for k, v in files_under(cache).items()},
                  **{f"exports/{k}": v for k, v in files_under(exports).items()}}
        run = manage(site, "models", *args, timeout=600)
        after = {**{f"cache/{k}": v for k, v in files_under(cache).items()},
                 **{f"exports/{k}": v for k, v in files_under(exports).items()}}
        new = sorted(name for name in after if name not in before and not name.startswith("cache/.locks/"))
        changed = sorted(name for name in after if name in before and after[name] != before[name]
                         and not name.startswith("cache/.locks/"))
        message = (run.stderr.strip().splitlines() or [""])[-1][:200]
        details.append({"operation": label, "exit": run.returncode, "message": message, "traceback": run.traceback,
                        "new files": new, "changed files": changed})
    rows = _rows(site.root)
    dangling = [path for _, path in rows if not (cache / path).exists()]
    verify = manage(site, "models", "verify", "--no-functional", "--json", timeout=300)
    refused = sum(1 for d in details if d["exit"] not in (0, None) and not d["traceback"])
    clear = sum(1 for d in details if "space" in d["message"].lower())
    leftovers = sum(len(d["new files"]) + len(d["changed files"]) for d in details)
    result.runs = len(details)
    result.figures = {
        "operations": len(details),
        "refused cleanly": refused,
        "said 'no space'": clear,
        "tracebacks": sum(d["traceback"] for d in details),
        "leftover files": leftovers,
        "rows without file": len(dangling),
        "cache still verifies": verify.returncode == 0,
    }
    result.details = details
    result.expect(refused == len(details), "not refused cleanly: " + ", ".join(
        d["operation"] for d in details if d["exit"] in (0, None) or d["traceback"]))
    result.expect(clear == len(details), "the error does not say the disk is full: " + ", ".join(
        f"{d['operation']} ({d['message'][:80]})" for d in details if "space" not in d["message"].lower()))
    result.expect(leftovers == 0, "left behind: " + ", ".join(
        name for d in details for name in d["new files"] + d["changed files"]))
    result.expect(not dangling, f"records without a file: {dangling}")
    result.expect(verify.returncode == 0, "the cached file no longer verifies")
    return result
