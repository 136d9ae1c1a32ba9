"""Job media (uploads, previews, results) through Django's default storage: a local folder or an S3-compatible store.

Everything a job stores goes through `django.core.files.storage.default_storage`, so one setting
(STORAGES["default"], see DEPTHSITE_MEDIA_STORAGE) moves it. Results are written to a local staging
folder first, then published: on a local storage by renaming the folder into place (one atomic rename,
as before), on an object store by one put per file (each put is atomic: a reader sees the whole object
or none). Names are storage names (POSIX, relative); a name a row holds is checked before it is used.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterable

from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, default_storage

from depthsite.exceptions import NotFoundError

RESULTS_DIR = "results"
STAGING_PREFIX = ".tmp-"
_CHUNK = 1024 * 1024


class MediaStoreError(RuntimeError):
    """The media storage did not store a file under the name it was given (it must overwrite, not rename)."""


def media_storage() -> Storage:
    return default_storage


def media_local_path(name: str) -> Path | None:
    """The file system path of a name on a local storage; None on a remote one (an object store)."""
    try:
        return Path(media_storage().path(name))
    except NotImplementedError:
        return None


def media_name_check(name: str | None, *, under: str = "") -> str | None:
    """`name` when it is a plain relative storage name (inside `under/` when given), else None.

    A name read from a row never leads outside the media store, nor outside the folder it belongs to."""
    if not name or "\\" in name or "\x00" in name:
        return None
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        return None
    if under and path.parts[:len(PurePosixPath(under).parts)] != PurePosixPath(under).parts:
        return None
    if under and len(path.parts) <= len(PurePosixPath(under).parts):
        return None  # the folder itself is not a file in it
    return str(path)


def media_exists(name: str) -> bool:
    local = media_local_path(name)
    if local is not None:
        return local.is_file()
    return media_storage().exists(name)


def media_size(name: str) -> int | None:
    """Bytes of a stored file; None when it is missing."""
    local = media_local_path(name)
    if local is not None:
        return local.stat().st_size if local.is_file() else None
    try:
        return media_storage().size(name)
    except (FileNotFoundError, OSError):
        return None
    except Exception as exc:  # botocore's ClientError for a missing key
        if _missing(exc):
            return None
        raise


def _missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


def media_open(name: str) -> File:
    """A stored file opened for reading (the caller closes it; FileResponse does)."""
    return media_storage().open(name, "rb")


def media_open_served(name: str) -> File:
    """media_open for a download view: NotFoundError (404) when the file is gone, e.g. its job was deleted between
    the view's access check and this open; any other storage failure still raises as it is."""
    try:
        return media_open(name)
    except FileNotFoundError:
        pass
    except Exception as exc:  # botocore's ClientError for a missing key
        if not _missing(exc):
            raise
    raise NotFoundError("the file is no longer stored (its job was deleted or expired)", extra={"kind": "gone"})


def media_staging_root() -> Path:
    """Where results are written before they are published.

    Inside the results folder on a local storage (one file system, so publishing is a rename, and a killed
    worker's staging folder is found by the recovery's sweep); a local scratch folder before an object store."""
    local = media_local_path(RESULTS_DIR)
    return local if local is not None else Path(settings.DEPTHSITE_MEDIA_STAGING)


def media_put(*, name: str, source: Path) -> None:
    """Store the local file `source` under `name`, replacing what was there; `source` is consumed.

    Local: renamed into place (source lies in the staging root, on the same file system). Remote: one put."""
    local = media_local_path(name)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, local)
        return
    with source.open("rb") as handle:
        saved = media_storage().save(name, File(handle, name=source.name))
    source.unlink(missing_ok=True)
    if saved != name:
        media_storage().delete(saved)
        raise MediaStoreError(f"the media storage stored {name} as {saved}; configure it to overwrite "
                              "(S3Storage file_overwrite=True)")


def media_folder_publish(*, source: Path, prefix: str) -> list[str]:
    """Make the files of the local folder `source` the content of `prefix/`, replacing an earlier content;
    returns their storage names. `source` is consumed."""
    local = media_local_path(prefix)
    names = sorted(f"{prefix}/{path.name}" for path in source.iterdir() if path.is_file())
    if local is not None:
        if local.exists():
            shutil.rmtree(local)  # a re-run's earlier files
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, local)
        return names
    wanted = set(names)
    for stale in media_list(prefix):
        if stale not in wanted:
            media_storage().delete(stale)
    for name in names:
        media_put(name=name, source=source / PurePosixPath(name).name)
    shutil.rmtree(source, ignore_errors=True)
    return names


def media_fetch(*, name: str, dest: Path) -> None:
    """A local copy of a stored file for a new job's staging folder: a hard link where the storage is this
    file system (copies otherwise), a download from an object store."""
    local = media_local_path(name)
    if local is not None:
        try:
            os.link(local, dest)
        except OSError:
            shutil.copy2(local, dest)
        return
    with media_open(name) as stored, dest.open("wb") as out:
        for chunk in stored.chunks(_CHUNK):
            out.write(chunk)


def media_list(prefix: str) -> list[str]:
    """Every stored file under `prefix/`, at any depth (none when the folder does not exist)."""
    storage = media_storage()
    try:
        folders, files = storage.listdir(prefix)
    except FileNotFoundError:
        return []
    names = [f"{prefix}/{name}" for name in files]
    for folder in folders:
        names.extend(media_list(f"{prefix}/{folder}"))
    return names


def media_usage(names: Iterable[str]) -> int:
    """Bytes of the given names; a name ending in "/" is a folder and counts everything under it."""
    total = 0
    for name in names:
        if name.endswith("/"):
            total += sum(media_size(item) or 0 for item in media_list(name.rstrip("/")))
        else:
            total += media_size(name) or 0
    return total


def media_remove(names: Iterable[str]) -> int:
    """Delete the given names (a name ending in "/" is a whole folder); returns the bytes freed. Missing is fine."""
    freed = 0
    storage = media_storage()
    for name in names:
        if name.endswith("/"):
            prefix = name.rstrip("/")
            local = media_local_path(prefix)
            if local is not None:
                if local.is_dir():
                    freed += sum(item.stat().st_size for item in local.rglob("*") if item.is_file())
                    shutil.rmtree(local, ignore_errors=True)
                continue
            for item in media_list(prefix):
                freed += media_size(item) or 0
                storage.delete(item)
        else:
            size = media_size(name)
            if size is not None:
                freed += size
                storage.delete(name)
    return freed
