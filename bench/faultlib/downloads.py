"""Downloads under faults: `manage.py models download` processes killed mid-body, and many at once.

The mirror is depthsite.testing.weightserver on 127.0.0.1 (Range/ETag, a byte rate, a log of every request);
`DEPTHSITE_MODEL_MIRROR` points the site at it. Figures come from the server's request log (GETs, Range
headers, 206s, bytes sent), the files in the cache and the site's database.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

from bench.faultlib.common import MANAGE, PYTHON, Result, Workspace, kill_group, manage, spawn, stop
from depthsite.testing.weightserver import WeightServer

FILE_NAME = "midas_v21_small_256.pt"


def _sha256(path: Path, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        left = path.stat().st_size if length is None else length
        while left > 0:
            chunk = handle.read(min(4 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _prefix_ok(part: Path, source: Path) -> bool:
    size = part.stat().st_size
    return size <= source.stat().st_size and _sha256(part) == _sha256(source, size)


def _pin(root: Path, model: str) -> tuple[str, str]:
    with sqlite3.connect(root / "db.sqlite3", timeout=30) as conn:
        return conn.execute("SELECT expected_sha256, expected_content_digest FROM models_registry_registeredmodel "
                            "WHERE name = ?", (model,)).fetchone()


def kill_mid_download(workspace: Workspace) -> Result:
    """Kill -9 a download N times at growing offsets; the next run resumes; the last one completes and pins."""
    result = Result("kill-download")
    kills = 4 if workspace.quick else 20
    source = workspace.checkpoint()
    served = workspace.folder("mirror-kill")
    os.link(source, served / FILE_NAME) if not (served / FILE_NAME).exists() else None
    size = source.stat().st_size
    step = size // (kills + 2)
    with WeightServer(served) as server:
        # Slow enough that a step of the file takes ~0.25 s, so each kill lands in the middle of a body.
        server.configure(rate=max(step * 4, 1 << 20))
        site = workspace.site("kill-download", DEPTHSITE_MODEL_MIRROR=server.url)
        folder = site.cache_dir / "MiDaS_small"
        part, final = folder / f"{FILE_NAME}.part", folder / FILE_NAME
        corrupt, kill_sizes, problems = 0, [], []
        for attempt in range(kills):
            log = site.root / f"download-{attempt}.log"
            process = spawn([PYTHON, MANAGE, "models", "download", "--model", "MiDaS_small", "--json"],
                            env=site.env(), log=log)
            target = (attempt + 1) * step
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                if part.exists() and part.stat().st_size >= target:
                    break
                time.sleep(0.005)
            if process.poll() is not None:
                problems.append(f"download {attempt} ended by itself (exit {process.returncode}) before its kill")
                break
            kill_group(process, signal.SIGKILL)
            process.wait(timeout=30)
            stop(process)
            left = part.stat().st_size if part.exists() else 0
            kill_sizes.append(left)
            # A half file under the final name, or partial bytes that are not the source's, is a corrupt file.
            if final.exists():
                corrupt += 1
                problems.append(f"kill {attempt}: {final.name} exists before the download finished")
            if part.exists() and not _prefix_ok(part, source):
                corrupt += 1
                problems.append(f"kill {attempt}: the partial file is not a prefix of the served file")
        finished = manage(site, "models", "download", "--model", "MiDaS_small", "--json", timeout=600)
        gets = server.gets(FILE_NAME)
        sent = server.bytes_sent
    # Run k+1 resumes the bytes kill k left: its GET asks for exactly that offset and gets 206.
    resumed = 0
    for previous, request in zip(kill_sizes, gets[1:]):
        if previous and request.range == f"bytes={previous}-" and request.status == 206:
            resumed += 1
    body = {}
    try:
        body = json.loads(finished.stdout)
    except ValueError:
        problems.append(f"final download: exit {finished.returncode}: {finished.stderr.strip()[-300:]}")
    cached_ok = final.exists() and _sha256(final) == _sha256(source)
    if final.exists() and not cached_ok:
        corrupt += 1
    pinned_sha, _ = _pin(site.root, "MiDaS_small")
    pinned = bool(body.get("pinned")) and pinned_sha == _sha256(source)
    verify = manage(site, "models", "verify", "--no-functional", "--json", timeout=300)
    verified = verify.returncode == 0
    if not verified:
        corrupt += 1
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".part.json")) or
                       p.name.startswith(".tmp-"))
    result.runs = len(kill_sizes)
    result.figures = {
        "kills": len(kill_sizes),
        "resumed": f"{resumed}/{len(kill_sizes)}",
        "corrupt files": corrupt,
        "completed": finished.returncode == 0 and cached_ok,
        "pinned": pinned,
        "bytes sent / file": round(sent / size, 3),
        "leftover partials": len(leftovers),
    }
    result.details = [{"file_bytes": size, "kill_offsets": kill_sizes,
                       "requests": [{"range": r.range, "status": r.status, "bytes": r.body_bytes} for r in gets],
                       "final": body, "problems": problems, "leftovers": leftovers}]
    result.expect(len(kill_sizes) == kills, f"only {len(kill_sizes)} of {kills} kills landed mid-body")
    result.expect(resumed == len(kill_sizes), f"{len(kill_sizes) - resumed} restart(s) did not resume")
    result.expect(corrupt == 0, "; ".join(problems) or f"{corrupt} corrupt file(s)")
    result.expect(finished.returncode == 0 and cached_ok and pinned and verified, "the last download did not "
                  "complete, verify and pin")
    result.expect(not leftovers, f"left behind: {', '.join(leftovers)}")
    return result


SHELL_CREATE = """
from models_registry.models import RegisteredModel
small = RegisteredModel.objects.get(name="MiDaS_small")
for name in {names!r}:
    RegisteredModel.objects.update_or_create(name=name, defaults=dict(
        display_name=name, architecture=small.architecture, file_name=name + ".pt",
        semantics=small.semantics, source_url=""))
"""


def concurrent_downloads(workspace: Workspace) -> Result:
    """P processes each download the same M models (in rotated orders) at once: one transfer per model."""
    result = Result("concurrent-download")
    processes, count = (2, 2) if workspace.quick else (4, 3)
    source = workspace.checkpoint()
    size = source.stat().st_size
    # MiDaS_small and custom entries on its architecture (generated weights; one file per entry on the mirror).
    models = ["MiDaS_small"] + [f"bench_small_{n}" for n in range(1, count)]
    served = workspace.folder("mirror-concurrent")
    for model in models:
        name = FILE_NAME if model == "MiDaS_small" else f"{model}.pt"
        if not (served / name).exists():
            os.link(source, served / name)
    with WeightServer(served) as server:
        server.configure(rate=40 * 1024 * 1024)  # ~2 s per file: every process arrives while a transfer runs
        site = workspace.site("concurrent", DEPTHSITE_MODEL_MIRROR=server.url)
        created = manage(site, "shell", "-c", SHELL_CREATE.format(names=models[1:]), timeout=120)
        if created.returncode != 0:
            raise RuntimeError(f"could not register the extra models: {created.stderr[-500:]}")
        children = []
        for n in range(processes):
            order = models[n % count:] + models[:n % count]
            script = " && ".join(f"{PYTHON} {MANAGE} models download --model {model} --json > out-{n}-{model}.json"
                                 for model in order)
            children.append(spawn(["sh", "-c", script], env=site.env(), log=site.root / f"proc-{n}.log",
                                  cwd=site.root))
        deadline = time.monotonic() + 600
        for child in children:
            child.wait(timeout=max(1, deadline - time.monotonic()))
        failed = sum(child.returncode != 0 for child in children)
        gets = {model: server.gets(FILE_NAME if model == "MiDaS_small" else f"{model}.pt") for model in models}
        sent = server.bytes_sent
    transfers, ok, corrupt, reported = {}, 0, 0, {}
    digest = _sha256(source)
    for model in models:
        transfers[model] = sum(1 for r in gets[model] if r.status in (200, 206))
        reported[model] = 0
        for n in range(processes):
            out = site.root / f"out-{n}-{model}.json"
            try:
                body = json.loads(out.read_text())
            except (OSError, ValueError):
                continue
            ok += 1
            reported[model] += bool(body.get("transferred"))
            if body.get("sha256") != digest or _sha256(Path(body["path"])) != digest:
                corrupt += 1
    total = processes * count
    result.runs = total
    result.figures = {
        "processes x models": f"{processes} x {count}",
        "succeeded": f"{ok}/{total}",
        "transfers per model": "/".join(str(transfers[m]) for m in models),
        "downloads that transferred": sum(reported.values()),
        "bytes sent / files": round(sent / (size * count), 3),
        "corrupt": corrupt,
    }
    result.details = [{"models": models, "gets": {m: [(r.range, r.status, r.body_bytes) for r in g]
                                                  for m, g in gets.items()}}]
    result.expect(ok == total and failed == 0, f"{total - ok} download(s) failed")
    result.expect(all(value == 1 for value in transfers.values()), "a model was transferred more than once")
    result.expect(all(value == 1 for value in reported.values()), "not exactly one process per model transferred")
    result.expect(corrupt == 0, f"{corrupt} corrupt file(s)")
    return result
