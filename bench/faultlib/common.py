"""What every scenario shares: the result row, a scratch folder, child processes that die with the bench, sites.

Every child process is started in its own session and remembered, so that a normal end, an exception,
Ctrl-C or SIGTERM kills each group that is still alive (and runs the registered cleanups, e.g. unmount).
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from depthsite.testing.cli import Site  # noqa: E402  (needs ROOT on sys.path)

PYTHON = sys.executable
MANAGE = str(ROOT / "manage.py")

PASS, FAIL, SKIP = "pass", "FAIL", "skipped"


@dataclass
class Result:
    """One row of the table: figures measured by a run, and the verdict they give."""

    scenario: str
    runs: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    verdict: str = PASS
    notes: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def expect(self, condition: bool, why: str) -> None:
        """A failed expectation turns the verdict to FAIL and says which."""
        if not condition:
            self.verdict = FAIL
            self.notes.append(why)

    def skip(self, why: str) -> "Result":
        self.verdict = SKIP
        self.notes.append(why)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "runs": self.runs, "figures": self.figures, "verdict": self.verdict,
                "notes": self.notes, "seconds": round(self.seconds, 1), "details": self.details}


# --- children and cleanups ---------------------------------------------------------------------------

_children: list[subprocess.Popen] = []
_cleanups: list[Callable[[], None]] = []


def on_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` when the bench ends, however it ends (last registered runs first)."""
    _cleanups.append(callback)
    return callback


def forget_cleanup(callback: Callable[[], None]) -> None:
    if callback in _cleanups:
        _cleanups.remove(callback)


def spawn(args: list[str], *, env: dict, log: Path | None = None, cwd: Path = ROOT, **kwargs) -> subprocess.Popen:
    """A child in its own session (so its whole group can be killed), stdout+stderr to `log`."""
    handle = open(log, "ab") if log is not None else subprocess.DEVNULL
    try:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True, **kwargs)
    finally:
        if log is not None:
            handle.close()
    _children.append(process)
    return process


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(process: subprocess.Popen, *, grace: float = 15) -> None:
    """SIGTERM to the leader (qcluster stops its own children), then SIGKILL to whatever is left of the group."""
    if process.poll() is None:
        try:
            process.terminate()
            process.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    kill_group(process)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if process in _children:
        _children.remove(process)


def cleanup_all() -> None:
    for process in list(_children):
        kill_group(process)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    _children.clear()
    while _cleanups:
        callback = _cleanups.pop()
        try:
            callback()
        except Exception as exc:  # a cleanup must not hide the others
            print(f"warning: cleanup failed: {exc}", file=sys.stderr)


def _on_signal(signum, frame):
    cleanup_all()
    raise SystemExit(128 + signum)


def install_handlers() -> None:
    atexit.register(cleanup_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


# --- measured subprocess runs --------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float
    max_rss_kb: int

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr or "Traceback (most recent call last)" in self.stdout


TIME = Path("/usr/bin/time")


def run_measured(args: list[str], *, env: dict, timeout: float, cwd: Path = ROOT,
                 watch: Callable[[], None] | None = None) -> Run:
    """Run a child to its end (or kill it at `timeout`), with its output and its own peak RSS.

    The peak RSS comes from GNU time wrapped around the command: a child forked from this (big) process
    would inherit this process's high-water mark in its rusage. `watch` is called every few milliseconds
    while the child runs (to sample what it does to the disk).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        command = [str(TIME), "-q", "-f", "%M", "-o", rss.name, *args] if TIME.exists() else args
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        _children.append(process)
        started = time.monotonic()
        timed_out = False
        while process.poll() is None:
            if time.monotonic() - started > timeout:
                kill_group(process)
                process.wait()
                timed_out = True
                break
            if watch is not None:
                watch()
            time.sleep(0.02)
        _children.remove(process)
        kill_group(process)  # grandchildren it left behind
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        numbers = [line for line in rss.read().split() if line.isdigit()]
        return Run(None if timed_out else process.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"), seconds, int(numbers[-1]) if numbers else 0)


# --- sites ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_site(root: Path, template: Path | None = None, **extra_env: str) -> Site:
    """A migrated site under `root`: copied from a migrated template (fast) or migrated here."""
    if template is not None:
        shutil.copytree(template, root)
        return Site(root=root, extra_env=extra_env)
    root.mkdir(parents=True, exist_ok=True)
    site = Site(root=root, extra_env=extra_env)
    result = site.manage("migrate", "--noinput", "-v0", timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed: {result.stderr[-2000:]}")
    return site


def manage(site: Site, *args: str, timeout: float = 300, watch: Callable[[], None] | None = None,
           **env: str) -> Run:
    """`manage.py ARGS` of a site in a measured subprocess (env overrides on top of the site's)."""
    return run_measured([PYTHON, MANAGE, *args], env=site.env(**env), timeout=timeout, watch=watch)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of measured values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every regular file under `folder`."""
    found = {}
    if not folder.exists():
        return found
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            found[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return found


class Workspace:
    """The bench's scratch folder and the things scenarios share (a migrated template, a checkpoint)."""

    def __init__(self, root: Path, *, quick: bool):
        self.root = root
        self.quick = quick
        self._template: Path | None = None
        self._checkpoints: dict[str, Path] = {}

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def template(self) -> Path:
        """A migrated site folder (db + catalogue) to copy: migrate runs once per bench run."""
        if self._template is None:
            site = new_site(self.root / "template")
            self._template = site.root
        return self._template

    def site(self, name: str, **extra_env: str) -> Site:
        root = self.root / name
        if root.exists():
            shutil.rmtree(root)
        return new_site(root, self.template(), **extra_env)

    def checkpoint(self, model: str = "MiDaS_small", fmt: str = "pt") -> Path:
        """A generated official-layout checkpoint of `model` (deterministic weights), written once by a child."""
        key = f"{model}.{fmt}"
        if key not in self._checkpoints:
            from models_registry.catalogue import CATALOGUE  # plain data: no Django, no torch

            stem = Path(next(entry.file_name for entry in CATALOGUE if entry.name == model)).stem
            path = self.folder("checkpoints") / f"{stem}.{fmt}"
            code = ("import sys; from models_registry.detweights import det_numpy_state_dict; "
                    "from models_registry.formats import write_weights; "
                    "write_weights(det_numpy_state_dict(sys.argv[1]), sys.argv[2], sys.argv[3], {})")
            done = subprocess.run([PYTHON, "-c", code, model, str(path), fmt], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise RuntimeError(f"could not generate a {model} checkpoint: {done.stderr[-2000:]}")
            self._checkpoints[key] = path
        return self._checkpoints[key]
