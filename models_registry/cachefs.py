"""The cache folder on disk: paths, per-model file locks, and writes that never leave a half file under a final name.

Only `cache_root` and `node_name` read Django's settings (imported there): the file helpers serve the
Django-free fetcher (models_registry.fetch) as well."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from depthsite.exceptions import ApplicationError, ConflictError, DiskFullError, InvalidRequestError

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
PARTIAL_SUFFIX = ".part"
LOCK_DIR = ".locks"
COPY_CHUNK = 4 * 1024 * 1024


# A model name or a file name becomes one path component: a letter or digit first (so never "", "." or
# "..", nor a hidden or temporary name), then letters, digits and . _ - + only (no separator, no control).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
RESERVED_SUFFIXES = (PARTIAL_SUFFIX, PARTIAL_SUFFIX + ".json", ".lock")


def name_problem(value: str) -> str:
    """Why `value` cannot be one file or folder name in the cache ("" when it can)."""
    if not isinstance(value, str) or not value:
        return "is empty"
    if "/" in value or "\\" in value:
        return "must be a single name, without / or \\"
    if value.startswith("."):
        return "must not start with a dot (relative, hidden and temporary names are reserved)"
    if not _NAME_RE.fullmatch(value):
        return "may hold only letters, digits and . _ - + (starting with a letter or digit)"
    if value.endswith(RESERVED_SUFFIXES):
        return f"must not end with {', '.join(RESERVED_SUFFIXES)} (reserved for partial files and locks)"
    return ""


def safe_name(value: str, *, what: str) -> str:
    """`value` when it is a usable single path component; InvalidRequestError naming `what` otherwise."""
    problem = name_problem(value)
    if problem:
        raise InvalidRequestError(f"{what} {value!r} {problem}", extra={"kind": "unsafe_name", "value": str(value)})
    return value


def contained(root: Path, *parts: str | Path) -> Path:
    """`root / parts`, refused unless it lies strictly inside `root` once `..` and symlinks are resolved.

    Every path built from a name (a model's folder, a record's relative path, a mirror file) goes through
    here, so a name such as `/tmp/x` or `../..` can never make a read, write or delete happen elsewhere.
    """
    root = Path(root)
    candidate = root.joinpath(*parts)
    base = root.resolve()
    resolved = candidate.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        shown = "/".join(str(part) for part in parts)
        raise InvalidRequestError(f"the path {shown!r} leads outside its folder; refused",
                              extra={"kind": "unsafe_path", "path": shown})
    return candidate


def cache_root() -> Path:
    from django.conf import settings

    root = Path(settings.DEPTHSITE_CACHE_DIR).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def node_name() -> str:
    from django.conf import settings

    return settings.DEPTHSITE_NODE


def model_folder(model_name: str) -> Path:
    """The model's folder in the cache, without creating it."""
    return contained(cache_root(), safe_name(model_name, what="the model name"))


def model_dir(model_name: str) -> Path:
    path = model_folder(model_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def absolute(relative_path: str) -> Path:
    """The file a record's relative path names, inside the cache (InvalidRequestError otherwise)."""
    return contained(cache_root(), relative_path)


def relative(path: Path) -> str:
    return str(Path(path).resolve().relative_to(cache_root().resolve()))


def is_temporary(path: Path) -> bool:
    """A file being written: a temporary name, a partial download, or any file in a temporary folder (an
    artifact is checked in one under its final name)."""
    name = path.name
    return (name.startswith(TEMP_PREFIX) or path.parent.name.startswith(TEMP_PREFIX)
            or name.endswith((PARTIAL_SUFFIX, PARTIAL_SUFFIX + ".json")))


def lock_path(model_name: str) -> Path:
    folder = cache_root() / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return contained(folder, f"{safe_name(model_name, what='the model name')}.lock")


def model_lock(model_name: str, timeout: float = -1) -> FileLock:
    """An OS-level lock (flock) per model: released by the kernel if its holder dies, so it never sticks."""
    return FileLock(str(lock_path(model_name)), timeout=timeout)


@contextlib.contextmanager
def locked(model_name: str, timeout: float = 600, *, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold the model's lock (an flock: it dies with its holder); yields whether another process held it
    first, in which case `on_wait` is called before waiting up to `timeout` seconds (ConflictError after)."""
    lock = model_lock(model_name)
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        if on_wait is not None:
            on_wait()
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            held = f"{timeout / 3600:.0f} h" if timeout >= 3600 else f"{timeout:.0f} s"
            raise ConflictError(
                f"another process has held the lock of {model_name} for over {held}; try again later",
                extra={"lock": str(lock_path(model_name))},
            ) from None
    try:
        yield waited
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


# "No room for these bytes": the disk is full, the user's quota is spent, or the file outgrew a size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Writers that are not plain Python file objects report it in their own words: h5py raises RuntimeError or
# OSError("... errno = 28, error message = 'No space left on device' ..."), safetensors raises SafetensorError
# ("... Os { code: 28, kind: StorageFull ... }"). The errno numbers and the C library's texts name them all.
_NO_SPACE_TEXT = re.compile(
    r"errno\s*=\s*(?:%(codes)s)\b|\bcode:\s*(?:%(codes)s)\b|\[Errno (?:%(codes)s)\]"
    r"|No space left on device|Disk quota exceeded|File too large|StorageFull|QuotaExceeded|FileTooLarge"
    % {"codes": "|".join(str(code) for code in sorted(NO_SPACE_ERRNOS))},
    re.IGNORECASE,
)
# A writer whose error names no cause (torch.save's "file write failed") ran out of room when the
# filesystem it wrote to is left with less than this.
NEARLY_FULL_BYTES = 1024 * 1024


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the errors it was raised from or while handling (readers that raise `from None` hide the cause
    from tracebacks but keep it as __context__); at most 16, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_no_space(exc: BaseException, path: Path | None = None) -> bool:
    """Whether `exc` (raised while writing `path`) means there was no room for the bytes, whoever raised it."""
    if not isinstance(exc, Exception) or isinstance(exc, ApplicationError):
        return False
    for link in error_chain(exc):
        if isinstance(link, OSError) and link.errno in NO_SPACE_ERRNOS:
            return True
        if not isinstance(link, ApplicationError) and _NO_SPACE_TEXT.search(str(link)):
            return True
    if path is not None:
        with contextlib.suppress(OSError):
            return disk_free(Path(path).parent) < NEARLY_FULL_BYTES
    return False


def disk_full_error(path: Path, exc: BaseException | None = None) -> DiskFullError:
    return DiskFullError(
        f"no space left on the device holding {path.parent} while writing {path.name}; "
        "free some space (optimize the cache to a smaller size) and try again",
        extra={"kind": "disk_full", "path": str(path)},
    )


def ensure_room(path: Path, needed: int) -> None:
    """DiskFullError before writing when the filesystem holding `path` has less than `needed` bytes free."""
    path = Path(path)
    try:
        free = disk_free(path.parent)
    except OSError:
        return
    if needed > free:
        raise DiskFullError(
            f"no space left on the device holding {path.parent} for {path.name}: it needs about {needed} bytes "
            f"and {free} are free; free some space (optimize the cache to a smaller size) and try again",
            extra={"kind": "disk_full", "path": str(path), "needed": needed, "free": free},
        )


@contextlib.contextmanager
def disk_full_as_error(path: Path) -> Iterator[None]:
    """Turn "no space" while writing `path` (ENOSPC, EDQUOT or EFBIG, from any writer: plain files, h5py,
    safetensors, torch) into the one DiskFullError that says what to do."""
    try:
        yield
    except Exception as exc:
        if is_no_space(exc, path):
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
    """Delete a file (a symlink itself, never its target); the bytes it freed (0 if it was already gone)."""
    try:
        size = path.lstat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of the file at `path` itself (not a symlink's target); None when absent.

    A plan remembers what it saw with this, so that deleting later can tell a replaced file from the same one.
    """
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
