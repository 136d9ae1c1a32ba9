"""Damaged and hostile weight files through the real doors (`manage.py models import` / `models verify`).

Each case gets a fresh site (a copy of a migrated template), its file is built by `hostile.py`, and the
command runs in a subprocess whose peak RSS (wait4) and peak cache growth (sampled) are measured. A case
is *detected* when the command refuses it with a one-line error (non-zero exit, no traceback) in time and
within a memory and disk budget. Whatever is accepted is then converted and exported too, and every
output (stdout, stderr, cache files, exports) is searched for the secret file's bytes; files that appear
in the site folder outside the cache (a marker written by a pickle, a leftover temporary) are counted.
"""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from bench.faultlib import hostile
from bench.faultlib.common import Result, Workspace, files_under, manage

MB = 1024 * 1024
IGNORED_TOP = {"cache", "db.sqlite3", "db.sqlite3-wal", "db.sqlite3-shm", "db.sqlite3-journal", "var"}


def _outside(root: Path) -> dict[str, tuple[int, int]]:
    return {path: stat for path, stat in files_under(root).items() if path.split("/", 1)[0] not in IGNORED_TOP}


def _weight_rows(root: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(root / "db.sqlite3", timeout=30) as conn:
        return conn.execute("SELECT format, health FROM models_registry_weightfile").fetchall()


def _tree_bytes(folder: Path) -> int:
    return sum(size for size, _ in files_under(folder).values())


def _last_line(text: str) -> str:
    """The last non-empty line (the error line of a CLI message, the exception line of a traceback)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:200]


def _leaks(needles: list[bytes], texts: list[str], files: list[Path]) -> list[str]:
    found = []
    blob = "\n".join(texts).encode(errors="replace")
    if any(needle in blob for needle in needles):
        found.append("command output")
    for path in files:
        if path.is_file():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(path.name)
    return found


def _run_case(workspace: Workspace, index: int, case: hostile.Case, materials: hostile.Materials,
              needles: list[bytes], baseline_rss_kb: int | None) -> dict:
    site = workspace.site(f"badfile-{index:02d}")
    inputs = site.root / "input"
    inputs.mkdir()
    tmp = site.root / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    path = inputs / f"case{case.suffix}"
    if case.path == "verify":
        good = manage(site, "models", "import", str(materials.good_pt), "--model", "MiDaS_small", timeout=300, **env)
        if good.returncode != 0:
            raise RuntimeError(f"importing the good checkpoint failed: {_last_line(good.stderr)}")
    case.build(materials, path)
    before = _outside(site.root)
    size = path.stat().st_size if path.exists() else 0
    cache = site.cache_dir
    cache_start = _tree_bytes(cache)
    peak = {"bytes": cache_start}

    def sample():
        try:
            peak["bytes"] = max(peak["bytes"], _tree_bytes(cache))
        except OSError:
            pass  # a file vanished while being listed: the next sample sees the new state

    outputs: list[Path] = []
    texts: list[str] = []
    if case.path == "verify":
        cached = next(p for p in (cache / "MiDaS_small").iterdir() if p.suffix == ".pt")
        data = bytearray(cached.read_bytes())
        if case.name.startswith("bit flip"):
            data[len(data) // 2] ^= 0x10
            cached.write_bytes(bytes(data))
        else:
            with open(cached, "r+b") as handle:
                handle.truncate(len(data) * 3 // 4)
        run = manage(site, "models", "verify", "--json", timeout=case.timeout, watch=sample, **env)
        rows = _weight_rows(site.root)
        refused = run.returncode == 1 and rows and all(health != "ok" for _, health in rows)
        accepted = bool(rows) and any(health == "ok" for _, health in rows)
    else:
        run = manage(site, "models", "import", str(path), "--model", "MiDaS_small", timeout=case.timeout,
                     watch=sample, **env)
        rows = _weight_rows(site.root)
        refused = run.returncode not in (0, None) and not rows
        accepted = run.returncode == 0 or bool(rows)
    texts += [run.stdout, run.stderr]
    if accepted:
        # What a staff user could take away: an export in another format (converted from the cached file).
        follow = manage(site, "models", "export", "--model", "MiDaS_small", "--format", "pkl", "--output",
                        str(tmp / "out.pkl"), timeout=300, **env)
        texts += [follow.stdout, follow.stderr]
        outputs.append(tmp / "out.pkl")
    outputs += [cache / name for name in files_under(cache)]
    leaks = _leaks(needles, texts, outputs)
    (tmp / "out.pkl").unlink(missing_ok=True)  # ours, not the product's
    after = _outside(site.root)
    written = sorted(name for name, stat in after.items() if before.get(name) != stat)
    clear = not run.traceback and run.returncode is not None and _last_line(run.stderr).startswith("error")
    if case.path == "verify":
        clear = not run.traceback and run.returncode is not None
    rss_mb = run.max_rss_kb / 1024
    cache_growth = max(0, peak["bytes"] - cache_start)
    over_budget = []
    if case.path == "import" and baseline_rss_kb is not None:
        if run.max_rss_kb > baseline_rss_kb + (3 * size + 128 * MB) // 1024:
            over_budget.append(f"peak RSS {rss_mb:.0f} MB for a {size / MB:.1f} MB file")
        if cache_growth > max(2 * size, MB):
            over_budget.append(f"{cache_growth / MB:.0f} MB written to the cache for a {size / MB:.1f} MB file")
    outcome = ("hung" if run.timed_out else "accepted" if accepted else "crashed" if not clear
               else "refused" if refused else "unclear")
    detected = outcome == "refused" and not over_budget
    detail = {
        "case": case.name, "class": case.klass, "path": case.path, "file_bytes": size, "outcome": outcome,
        "detected": detected, "exit": run.returncode, "message": _last_line(run.stderr),
        "peak_rss_mb": round(rss_mb, 1), "cache_peak_growth_mb": round(cache_growth / MB, 1),
        "over_budget": over_budget, "secret_in": leaks, "written_outside_cache": written,
        "seconds": round(run.seconds, 1),
    }
    shutil.rmtree(site.root, ignore_errors=True)
    return detail


def bad_weight_files(workspace: Workspace) -> Result:
    from models_registry.detweights import det_numpy_state_dict

    result = Result("bad-weights")
    cases = [case for case in hostile.CASES if not workspace.quick or case.name in hostile.QUICK]
    folder = workspace.folder("badfiles")
    materials = hostile.make_materials(folder, det_numpy_state_dict("MiDaS_small"), workspace.checkpoint())
    needles = hostile.secret_needles(materials.secret.read_bytes())
    # What a command costs before it reads any file: Django, numpy, h5py and torch imported (a .pt or a
    # functional check needs torch). A case's budget is this plus three times its file plus 128 MB.
    probe = workspace.site("badfile-baseline")
    measured = manage(probe, "shell", "-c", "import h5py, numpy, torch, safetensors", timeout=300)
    baseline = measured.max_rss_kb if measured.returncode == 0 and measured.max_rss_kb else None
    shutil.rmtree(probe.root, ignore_errors=True)
    details = [_run_case(workspace, index, case, materials, needles, baseline) for index, case in enumerate(cases)]
    result.runs = len(details)
    detected = sum(d["detected"] for d in details)
    leaked = sum(bool(d["secret_in"]) for d in details)
    outside = sum(bool(d["written_outside_cache"]) for d in details)
    result.figures = {
        "detected": f"{detected}/{len(details)} ({100 * detected / max(1, len(details)):.0f} %)",
        "accepted": sum(d["outcome"] == "accepted" for d in details),
        "crashed": sum(d["outcome"] == "crashed" for d in details),
        "hung": sum(d["outcome"] == "hung" for d in details),
        "over budget": sum(bool(d["over_budget"]) for d in details),
        "secret leaked": leaked,
        "written outside cache": outside,
        "max RSS MB": max(d["peak_rss_mb"] for d in details) if details else None,
        "baseline RSS MB": round(baseline / 1024, 1) if baseline else None,
    }
    result.details = details
    result.expect(detected == len(details), "not detected: " + ", ".join(
        f"{d['case']} ({d['outcome']}{'; ' + '; '.join(d['over_budget']) if d['over_budget'] else ''})"
        for d in details if not d["detected"]))
    result.expect(leaked == 0, f"secret bytes leaked in {leaked} case(s)")
    result.expect(outside == 0, f"files written outside the cache in {outside} case(s)")
    shutil.rmtree(folder, ignore_errors=True)
    return result
