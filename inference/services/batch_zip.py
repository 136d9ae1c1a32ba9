"""The outputs of a batch as one zip: what it holds (names, manifest), then the archive streamed piece by piece."""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Iterator, Sequence

from inference.media import media_open, media_size
from inference.models import DepthBatch, DepthJob
from inference.selectors import depth_job_file
from inference.writers import SUFFIXES
from depthsite.exceptions import NotFoundError, InvalidRequestError

_CHUNK = 1024 * 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+()-]+")


def batch_result_open(*, job: DepthJob, fmt: str) -> tuple[BinaryIO, int]:
    """One finished output of a job, opened for reading, and its size: the only place batches read result files
    (through `depth_job_file`, which keeps every name inside the job's results folder of the media storage)."""
    result = depth_job_file(job=job, fmt=fmt)
    handle = media_open(result.name)
    return handle, media_size(result.name) or 0


def _safe_stem(name: str) -> str:
    stem = PurePosixPath((name or "").replace("\\", "/")).stem
    safe = _SAFE_NAME.sub("_", stem).strip("._")[:80]
    return safe or "image"


@dataclass(frozen=True)
class ArchiveEntry:
    name: str
    job: DepthJob
    fmt: str


def depth_batch_archive_plan(*, batch: DepthBatch, jobs: Sequence[DepthJob]) -> tuple[list[ArchiveEntry], dict]:
    """What the zip of a batch holds: each finished job's outputs named `<photo>-depth<suffix>` (names made
    safe and unique), and a manifest of every job, finished or not."""
    entries: list[ArchiveEntry] = []
    taken: set[str] = {"manifest.json"}
    listed = []
    for job in jobs:
        stem = base = _safe_stem(job.image_name)
        number = 1
        while any(f"{stem}-depth{SUFFIXES[fmt]}".lower() in taken for fmt in SUFFIXES):
            number += 1
            stem = f"{base}-{number}"
        files = {}
        for fmt in job.result_files or {}:
            if fmt not in SUFFIXES:
                continue
            try:
                depth_job_file(job=job, fmt=fmt)
            except (NotFoundError, InvalidRequestError):
                continue
            name = f"{stem}-depth{SUFFIXES[fmt]}"
            taken.add(name.lower())
            entries.append(ArchiveEntry(name=name, job=job, fmt=fmt))
            files[fmt] = name
        listed.append({"id": str(job.pk), "input": job.image_name, "status": job.status, "error": job.error,
                       "model": job.model_name, "files": files})
    manifest = {"batch": str(batch.pk), "model": batch.model_name, "outputs": list(batch.outputs or []),
                "complete": all(job.is_terminal for job in jobs), "jobs": listed, "skipped": batch.skipped}
    return entries, manifest


class _Pipe:
    """A write-only stream zipfile writes into (no seek: it then writes data descriptors), emptied as it goes."""

    def __init__(self):
        self._chunks: list[bytes] = []
        self._offset = 0

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def depth_batch_archive_stream(*, entries: Sequence[ArchiveEntry], manifest: dict) -> Iterator[bytes]:
    """The zip, produced piece by piece: never the whole archive in memory, whatever the batch's size."""
    return (piece for piece in _archive_pieces(entries=entries, manifest=manifest) if piece)


def _archive_pieces(*, entries: Sequence[ArchiveEntry], manifest: dict) -> Iterator[bytes]:
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        bundle.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
        yield pipe.drain()
        for entry in entries:
            try:
                source, size = batch_result_open(job=entry.job, fmt=entry.fmt)
            except (NotFoundError, InvalidRequestError, OSError):
                continue  # deleted since the plan: the manifest still says what it was
            with source:
                info = zipfile.ZipInfo(entry.name, date_time=_zip_time(entry.job))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.file_size = size
                with bundle.open(info, mode="w", force_zip64=size > 0x7FFFFFFF) as target:
                    while chunk := source.read(_CHUNK):
                        target.write(chunk)
                        yield pipe.drain()
            yield pipe.drain()
    yield pipe.drain()


def _zip_time(job: DepthJob) -> tuple[int, int, int, int, int, int]:
    moment = job.finished_at or job.created_at
    return (max(1980, moment.year), moment.month, moment.day, moment.hour, moment.minute, moment.second)
