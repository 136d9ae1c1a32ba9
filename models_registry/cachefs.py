"""The cache folder on disk: paths, per-model file locks, and writes that never leave a half file under a final name."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from django.conf import settings
from filelock import FileLock, Timeout

from models_registry.exceptions import ConflictError, DiskFullError

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
PARTIAL_SUFFIX = ".part"
LOCK_DIR = ".locks"
COPY_CHUNK = 4 * 1024 * 1024


def cache_root() -> Path:
    root = Path(settings.DEPTHSITE_CACHE_DIR).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def node_name() -> str:
    return settings.DEPTHSITE_NODE


def model_dir(model_name: str) -> Path:
    path = cache_root() / model_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def absolute(relative_path: str) -> Path:
    return cache_root() / relative_path


def relative(path: Path) -> str:
    return str(Path(path).resolve().relative_to(cache_root().resolve()))


def is_temporary(path: Path) -> bool:
    name = path.name
    return name.startswith(TEMP_PREFIX) or name.endswith(PARTIAL_SUFFIX) or name.endswith(PARTIAL_SUFFIX + ".json")


def lock_path(model_name: str) -> Path:
    folder = cache_root() / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{model_name}.lock"


def model_lock(model_name: str, timeout: float = -1) -> FileLock:
    """An OS-level lock (flock) per model: released by the kernel if its holder dies, so it never sticks."""
    return FileLock(str(lock_path(model_name)), timeout=timeout)


@contextlib.contextmanager
def locked(model_name: str, timeout: float = 600) -> Iterator[None]:
    lock = model_lock(model_name, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ConflictError(
            f"another process has held the lock of {model_name} for over {timeout:.0f} s; try again later",
            extra={"lock": str(lock_path(model_name))},
        ) from None
    try:
        yield
    finally:
        lock.release()


def lock_is_free(path: Path) -> bool:
    """Whether nobody holds the lock file at `path` now (a non-blocking try)."""
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    lock.release()
    return True


def temp_path_for(dest: Path) -> Path:
    return dest.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{dest.name}"


def disk_full_error(path: Path, exc: OSError) -> DiskFullError:
    return DiskFullError(
        f"no space left on the device holding {path.parent} while writing {path.name}; "
        "free some space (models optimize --max-size ...) and try again",
        extra={"path": str(path)},
    )


@contextlib.contextmanager
def disk_full_as_error(path: Path) -> Iterator[None]:
    """Turn ENOSPC while writing `path` into a DiskFullError that says what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(path, exc) from None
        raise


@contextlib.contextmanager
def atomic_write(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success fsync and rename it to `dest`, else delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    try:
        with disk_full_as_error(dest):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def copy_with_sha256(source: Path, dest: Path) -> str:
    """Copy a file, returning the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(dest, "wb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def remove_file(path: Path) -> int:
    """Delete a file; the bytes it freed (0 if it was already gone)."""
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
