"""Disk full while writing weights: every writer ends in the one DiskFullError and leaves no file behind (issue 10).

The disks are real: small tmpfs mounts made by the test (root only; skipped where mount is refused), so the
errors are the ones h5py, safetensors, torch and plain files really raise, not imitations.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from models_registry import cachefs
from depthsite.exceptions import DiskFullError
from models_registry.formats import write_weights
from models_registry.services.export import weight_export
from models_registry.services.imports import weight_import

KB = 1024


@pytest.fixture
def tiny_disk(tmp_path):
    """A factory of small tmpfs folders; all unmounted at the end."""
    mounted: list[Path] = []

    def _mount(name: str, size: int) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()[:120]}")
        mounted.append(folder)
        return folder

    try:
        yield _mount
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _open_under(folder: Path) -> list[str]:
    """Files under `folder` this process still holds open (a leaked handle keeps a deleted file's space)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["h5", "safetensors", "pkl", "pt"])
def test_every_writer_on_a_full_disk_raises_disk_full_and_leaves_nothing(tiny_disk, small_arrays, fmt):
    disk = tiny_disk("disk", 256 * KB)
    with pytest.raises(DiskFullError, match="no space left on the device"):
        with cachefs.atomic_write(disk / f"weights.{fmt}") as tmp:
            write_weights(small_arrays, tmp, fmt)
    assert _files(disk) == []
    assert _open_under(disk) == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt,bundle", [("h5", False), ("safetensors", True), ("h5", True), ("pt", False)])
def test_export_to_a_full_disk_is_one_clear_error(tiny_disk, cached_small, small_model, fmt, bundle):
    exports = tiny_disk("exports", 512 * KB)
    with pytest.raises(DiskFullError, match="no space left"):
        weight_export(model=small_model, fmt=fmt, bundle=bundle, output=exports / "out")
    assert _files(exports) == []
    assert _open_under(exports) == []


def test_writer_errors_that_are_not_about_space_pass_through(tmp_path):
    # A writer's own failure (here h5py refusing a "/" in a name) must not be reported as a full disk.
    from depthsite.exceptions import WeightFileError

    import numpy as np

    with pytest.raises(WeightFileError):
        with cachefs.atomic_write(tmp_path / "w.h5") as tmp:
            write_weights({"a/b": np.zeros(2, np.float32)}, tmp, "h5")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("text", [
    "Can't decrement id ref count (unable to extend file properly, errno = 28, error message = "
    "'No space left on device')",
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
    "[Errno 122] Disk quota exceeded",
    "File too large",
])
def test_no_space_in_any_writers_words_is_recognised(text, tmp_path):
    assert cachefs.is_no_space(RuntimeError(text), tmp_path / "x")
    assert not cachefs.is_no_space(RuntimeError("errno = 2, No such file or directory"), tmp_path / "x")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["h5", "safetensors", "pkl"])
def test_efbig_from_a_file_size_limit_is_disk_full(tmp_path, fmt):
    # RLIMIT_FSIZE makes the writer's own write fail midway with EFBIG (SIGXFSZ ignored), past the room
    # check: each library's real error must become DiskFullError. In a child, as a crash there fails the test.
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))\n"
        "import django, os\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'depthsite.settings.test'\n"
        "django.setup()\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from models_registry import cachefs\n"
        "from depthsite.exceptions import DiskFullError\n"
        "from models_registry.formats import write_weights\n"
        "dest = Path(sys.argv[1]) / ('w.' + sys.argv[2])\n"
        "try:\n"
        "    with cachefs.atomic_write(dest) as tmp:\n"
        "        write_weights({'a': np.zeros(200_000, np.float32)}, tmp, sys.argv[2])\n"
        "except DiskFullError as exc:\n"
        "    print('DISK FULL', exc.message)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), fmt], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert "DISK FULL" in done.stdout, done.stderr[-2000:]
    assert _files(tmp_path) == []


def _bundle_of(tmp_path: Path, small_model, cached_small) -> Path:
    out = tmp_path / "inputs"
    out.mkdir()
    return weight_export(model=small_model, fmt="pt", bundle=True, output=out / "b.tar").path


@pytest.mark.slow
def test_bundle_import_onto_a_full_cache_leaves_nothing(tmp_path, tiny_disk, settings, small_model,
                                                         cached_small, monkeypatch):
    bundle = _bundle_of(tmp_path, small_model, cached_small)
    cache = tiny_disk("small-cache", 1024 * KB)
    settings.DEPTHSITE_CACHE_DIR = cache
    # The free-space check before extracting passes (as when another writer fills the disk meanwhile),
    # so the extraction itself meets the full disk.
    monkeypatch.setattr(cachefs, "disk_free", lambda path: 10**12)
    with pytest.raises(DiskFullError):
        weight_import(path=bundle)
    assert [name for name in _files(cache) if not name.startswith(".locks")] == []


def test_bundle_import_of_a_bad_member_leaves_nothing(tmp_path, settings, small_model, cached_small):
    bundle = _bundle_of(tmp_path, small_model, cached_small)
    cut = tmp_path / "cut.tar"
    with tarfile.open(bundle) as archive:
        member = [m for m in archive.getmembers() if m.name != "manifest.json"][0]
        end = member.offset_data + member.size // 2
    cut.write_bytes(bundle.read_bytes()[:end])
    before = _files(Path(settings.DEPTHSITE_CACHE_DIR))
    with pytest.raises(Exception) as caught:
        weight_import(path=cut)
    assert type(caught.value).__name__ in ("WeightFileError", "IntegrityError")
    assert _files(Path(settings.DEPTHSITE_CACHE_DIR)) == before


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_download_leaves_nothing(tiny_disk, small_model, small_arrays, tmp_path,
                                                               settings, monkeypatch):
    """Room for the file when the transfer starts; another writer takes it while the bytes arrive."""
    import threading

    from depthsite.testing.weightserver import WeightServer
    from models_registry import fetch
    from depthsite.choices import RunStatus
    from models_registry.models import WeightDownload, WeightFile
    from models_registry.services import transfer
    from models_registry.services.download import weight_download

    served = tmp_path / "served"
    served.mkdir()
    write_weights(small_arrays, served / "midas_v21_small_256.pt", "pt", {})
    size = (served / "midas_v21_small_256.pt").stat().st_size
    # Exactly what the pre-transfer check asks for (the file and its margin), and a little more.
    cache = tiny_disk("cache", size + transfer.DISK_MARGIN_BYTES + 4 * 1024 * KB)
    settings.DEPTHSITE_CACHE_DIR = cache
    monkeypatch.setattr(fetch, "RETRY_BACKOFF_SECONDS", 0.01)
    part = cache / "MiDaS_small" / "midas_v21_small_256.pt.part"
    stop = threading.Event()

    def other_tenant() -> None:
        # Waits for the first 8 MB to land, then writes until the disk is full (ENOSPC ends it).
        while not stop.is_set() and (not part.exists() or part.stat().st_size < 8 * 1024 * KB):
            stop.wait(0.01)
        with contextlib.suppress(OSError), open(cache / "other-tenant.bin", "wb") as filler:
            while not stop.is_set():
                filler.write(b"\0" * (1024 * KB))
                filler.flush()

    with WeightServer(served) as server:
        server.configure(rate=40 * 1024 * KB)  # about two seconds for the file: the filler wins the race
        settings.DEPTHSITE_MODEL_MIRROR = server.url
        thread = threading.Thread(target=other_tenant, daemon=True)
        thread.start()
        try:
            with pytest.raises(DiskFullError, match="no space left on the device"):
                weight_download(model=small_model)
        finally:
            stop.set()
            thread.join(timeout=10)
    (cache / "other-tenant.bin").unlink(missing_ok=True)
    assert [name for name in _files(cache) if not name.startswith(".locks")] == []
    assert not WeightFile.objects.exists()
    row = WeightDownload.objects.get(model=small_model)
    assert row.status == RunStatus.FAILED and "no space left" in row.error
    assert _open_under(cache) == []
