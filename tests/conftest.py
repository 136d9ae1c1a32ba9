"""Project-wide test fixtures: isolated cache and media folders, generated checkpoints, service probes."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.support.browser import chromium_browser, require_chromium
from models_registry.detweights import det_numpy_state_dict

REQUIRE_SERVICES = os.environ.get("DEPTHSITE_REQUIRE_SERVICES", "") == "1"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip with a reason where a service is absent; fail instead when DEPTHSITE_REQUIRE_SERVICES=1 (CI)."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}, and DEPTHSITE_REQUIRE_SERVICES=1 requires it")
    pytest.skip(message)


# pytest-xdist hands out whole test files (`--dist loadfile`), by default the files with the most tests first: the
# PostgreSQL re-run (one test, 70 s) and the real-process files (a few tests, 35-90 s each) came last, with one
# worker finishing alone. The Makefile turns that order off (--no-loadscope-reorder) and the files are handed out in
# the order below: those measured longest first (seconds of one run under `make test`, Zen 3, 2026-12-07), the
# rest by their number of tests, so that the short files fill in at the end.
LONGEST_FILES = (
    "tests/nets/test_fidelity_v31.py",  # 165 s
    "tests/inference/test_runtime.py",  # 130 s
    "tests/jobs/test_e2e_qcluster.py",  # 91 s
    "tests/inference/test_runtime_process.py",  # 81 s
    "tests/nets/test_fidelity.py",  # 75 s
    "tests/services/test_postgres.py",  # 70 s
    "tests/nets/test_fidelity_dav2.py",  # 53 s
    "tests/services/test_nodes_qcluster.py",  # 52 s
    "tests/registry/test_download.py",  # 51 s
    "tests/registry/test_commands.py",  # 50 s
    "tests/jobs/test_worker_exit.py",  # 42 s
    "tests/inference/test_cpu_half.py",  # 31 s
    "tests/jobs/test_point_cloud.py",  # 30 s
)


def pytest_collection_modifyitems(config, items):
    """Put the test files in the order they are best handed out to pytest-xdist's workers (LONGEST_FILES)."""
    missing = [name for name in LONGEST_FILES if not (Path(config.rootpath) / name).is_file()]
    if missing:  # a renamed file would silently lose its place
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FILES names files that do not exist: {missing}")
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        name = item.nodeid.split("::", 1)[0]
        counts[name] = counts.get(name, 0) + 1
        first.setdefault(name, index)

    def order(item) -> tuple[int, int, int]:
        name = item.nodeid.split("::", 1)[0]
        return (rank[name], 0, 0) if name in rank else (len(rank), -counts[name], first[name])

    items.sort(key=order)  # stable: the tests of a file keep their order (pytest-django's: transactional ones late)


def pytest_runtest_setup(item):
    """Every test marked `browser` skips (or, with DEPTHSITE_REQUIRE_BROWSER=1, fails) with one reason when
    Chromium is absent, before any of its fixtures (a live server, a checkpoint) is built."""
    if item.get_closest_marker("browser") is not None:
        require_chromium()


@pytest.fixture
def browser():
    """A headless Playwright browser on Debian's Chromium (tests/support/browser.py); one per test."""
    with chromium_browser() as launched:
        yield launched


@pytest.fixture(autouse=True)
def _isolated_storage(settings, tmp_path):
    """Every test gets its own weight cache and media folder: nothing touches the user's real ones.

    Under the test's own tmp_path, so pytest deletes them (checkpoints included) once the test passes.
    """
    root = tmp_path / "depthsite"
    settings.DEPTHSITE_CACHE_DIR = root / "cache"
    settings.MEDIA_ROOT = root / "media"
    settings.DEPTHSITE_NODE = "test-node"
    yield root


def _threads_per_process() -> int:
    """The cores shared out between pytest-xdist's workers (at most two each: the goldens were made with two)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(2, cores // workers))


def _leading_count(value: str) -> str | None:
    """OMP_NUM_THREADS's count for the outermost level ("4" of "4,2"), None when it names none."""
    head = value.split(",", 1)[0].strip()
    return head if head.isdigit() and int(head) > 0 else None


# Before any test imports torch (a plain subprocess a test starts inherits the share; the sites tests/support starts
# get it passed on, with the rest of their environment built there). DEPTHSITE_TORCH_THREADS too:
# its default (0, every core) made each worker's ONNX sessions and resize pool run two threads on a one-core
# share, and tests/inference took 107 s instead of 85 s under `-n 2`. A variable the caller set stands. pytest's
# controller imports this file before it starts the xdist workers, which inherit its environment: the variables
# set here are listed in _SHARED_BY_CONFTEST, so that each worker works its own share out again.
_SHARED_BY_CONFTEST = "DEPTHSITE_TEST_THREADS_SET_BY_CONFTEST"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "DEPTHSITE_TORCH_THREADS")


def _share_threads() -> set[str]:
    """Set each thread variable the caller did not set to this process's share; the names set."""
    ours = set(filter(None, os.environ.get(_SHARED_BY_CONFTEST, "").split(",")))
    share = str(_threads_per_process())
    shared = {name for name in _THREAD_VARIABLES if name in ours or not os.environ.get(name, "").strip()}
    for name in _THREAD_VARIABLES:  # OMP_NUM_THREADS first: the other follows it
        if name in shared:
            os.environ[name] = share if name == "OMP_NUM_THREADS" else _leading_count(os.environ["OMP_NUM_THREADS"]) \
                or share
    os.environ[_SHARED_BY_CONFTEST] = ",".join(sorted(shared))
    return shared


_THREADS_SHARED = _share_threads()


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """Torch and ONNX Runtime in this process use this worker's share of the cores, not all of them. The
    settings were read before this file, from the environment as it was."""
    from django.conf import settings

    if "DEPTHSITE_TORCH_THREADS" in _THREADS_SHARED:
        settings.DEPTHSITE_TORCH_THREADS = int(os.environ["DEPTHSITE_TORCH_THREADS"])
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


@pytest.fixture(scope="session", autouse=True)
def _no_fsync():
    """fsync is a no-op in the test process. What it buys (the bytes on disk after a power cut) no test can
    observe, and the suite writes hundreds of 85 MB checkpoints: 15 % of the registry's and the runtime's
    in-process tests' time here. Sites the tests start in subprocesses still sync."""
    patch = pytest.MonkeyPatch()
    patch.setattr(os, "fsync", lambda fd: None)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def small_arrays() -> dict[str, np.ndarray]:
    """MiDaS_small's official layout filled with the deterministic weight rule (numpy, computed once)."""
    return det_numpy_state_dict("MiDaS_small")


@pytest.fixture
def write_checkpoint(tmp_path, small_arrays) -> Callable[..., Path]:
    """Write MiDaS_small weights (or given arrays) in a format to a file outside the cache."""
    from models_registry.formats import write_weights

    def _write(fmt: str = "pt", name: str | None = None, arrays: dict | None = None,
               metadata: dict | None = None) -> Path:
        path = tmp_path / (name or f"checkpoint.{fmt}")
        write_weights(arrays if arrays is not None else small_arrays, path, fmt, metadata or {})
        return path

    return _write


@pytest.fixture(scope="session")
def _small_pt_bytes(tmp_path_factory, small_arrays) -> Path:
    """The official-layout MiDaS_small .pt, written once per process (85 MB; each test gets its own copy)."""
    from models_registry.formats import write_weights

    path = tmp_path_factory.mktemp("small-pt") / "midas_v21_small_256.pt"
    write_weights(small_arrays, path, "pt", {})
    return path


@pytest.fixture
def small_pt(tmp_path, _small_pt_bytes) -> Path:
    """An official-layout MiDaS_small .pt (a bare state_dict, as the release file is), the test's own copy."""
    path = tmp_path / _small_pt_bytes.name
    shutil.copyfile(_small_pt_bytes, path)
    return path


@pytest.fixture
def small_model(db):
    from models_registry.selectors import model_get

    return model_get(name="MiDaS_small")


@pytest.fixture(scope="session")
def _small_import(tmp_path_factory) -> dict:
    """What importing small_pt made, kept from the first test of this process that imports it: a copy of the
    cache file and the row's values (cached_small)."""
    return {"folder": tmp_path_factory.mktemp("small-import")}


_ROW_FIELDS_NOT_COPIED = ("id", "model", "node", "path", "verified_at", "created_at", "last_used_at")


@pytest.fixture
def cached_small(small_model, small_pt, _small_import):
    """MiDaS_small imported into the test cache as pt, unpinned (tests that need a pin set one); its WeightFile.

    The first test of a process runs the real import; later tests get what it made, a copy of the file at the
    same place in their own cache and a row with the same values, without repeating the 1 s of reading,
    hashing and checking 85 MB."""
    from django.forms.models import model_to_dict
    from django.utils import timezone

    from models_registry import cachefs
    from models_registry.models import WeightFile
    from models_registry.services.imports import weight_import
    from models_registry.services.records import cache_file_path

    kept = _small_import.get("file")
    if kept is None:
        weight_file = weight_import(path=small_pt, pin=False).weight_file
        kept = _small_import["folder"] / "weights.pt"
        shutil.copyfile(cachefs.absolute(weight_file.path), kept)
        _small_import["values"] = {name: value for name, value in model_to_dict(weight_file).items()
                                   if name not in _ROW_FIELDS_NOT_COPIED}
        _small_import["file"] = kept
        return weight_file
    dest = cache_file_path(model=small_model, fmt="pt")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kept, dest)
    now = timezone.now()
    return WeightFile.objects.create(model=small_model, node=cachefs.node_name(), path=cachefs.relative(dest),
                                     verified_at=now, created_at=now, **_small_import["values"])
