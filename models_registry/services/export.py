"""Convert a model's cached weights to another format, and export them as a file or a bundle with a manifest."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from django.utils import timezone

import depthsite
from depthsite.exceptions import ConflictError, DigestMismatchError, InvalidRequestError
from models_registry import cachefs
from models_registry.choices import Health, WeightFormat
from models_registry.formats import LoadedWeights, file_sha256, write_weights
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import weight_file_get
from models_registry.services.inspection import Inspection, weights_inspect
from models_registry.services.licences import model_license_check
from models_registry.services.records import (
    cache_file_path,
    node_check,
    weight_mark_corrupt,
    weight_pin_problem,
    weight_record,
    weights_load_usable,
)

logger = logging.getLogger(__name__)

BUNDLE_MANIFEST = "manifest.json"
BUNDLE_VERSION = 1


def _file_metadata(model: RegisteredModel, digest: str, **extra: str) -> dict[str, str]:
    return {
        "model": model.name,
        "architecture": model.architecture,
        "content_digest": digest,
        "depthsite_version": depthsite.__version__,
        **extra,
    }


def _write_converted(model: RegisteredModel, source: WeightFile, loaded: LoadedWeights, fmt: str,
                     dest: Path) -> Inspection:
    """Write `loaded` in `fmt` to `dest` (a temporary path), then prove by reading it back that nothing changed."""
    metadata = _file_metadata(model, source.content_digest, source_format=source.format,
                              source_sha256=source.sha256)
    write_weights(loaded.arrays, dest, fmt, metadata)
    written = weights_inspect(path=dest, architecture=model.architecture, fmt=fmt)
    if source.content_digest and written.digest != source.content_digest:
        raise DigestMismatchError(f"converting {model.name} to {fmt} changed its tensors (digest mismatch); nothing was kept")
    return written


def weight_convert(*, model: RegisteredModel, fmt: str) -> WeightFile:
    """Add a cached copy of a model in another format; the content digest proves both hold the same weights."""
    fmt = WeightFormat.parse(fmt).value
    with cachefs.locked(model.name):
        existing = weight_file_get(model=model, fmt=fmt)
        if existing is not None and existing.health == Health.OK and cachefs.absolute(existing.path).exists():
            return existing
        source, loaded = weights_load_usable(model=model, exclude=[fmt])
        dest = cache_file_path(model=model, fmt=fmt)
        with cachefs.atomic_write(dest) as tmp:
            inspection = _write_converted(model, source, loaded, fmt, tmp)
        inspection.path = dest
        weight_file = weight_record(model=model, fmt=fmt, path=dest, inspection=inspection,
                                    functional_hash=source.functional_hash, origin="convert",
                                    origin_source=f"the {source.format} copy, sha256 {source.sha256}",
                                    origin_by=source.origin_by)
    logger.info("converted %s from %s to %s (%d bytes)", model.name, source.format, fmt, weight_file.size)
    return weight_file


@dataclass
class ExportResult:
    path: Path
    model: str
    format: str
    size: int
    sha256: str
    content_digest: str
    bundle: bool
    manifest: dict[str, Any] = field(default_factory=dict)
    download_name: str = ""
    temporary: bool = False  # made for this export only: delete once it has been read
    # The cached file's handle whose bytes were hashed against `sha256`: served as is, so a file replaced after
    # the check cannot be streamed under the checked digest.
    checked_handle: BinaryIO | None = field(default=None, repr=False, compare=False)

    def open(self):
        """A read handle; a temporary export is unlinked at once (the open handle keeps its bytes alive)."""
        if self.checked_handle is not None:
            handle, self.checked_handle = self.checked_handle, None
            handle.seek(0)
            return handle
        handle = open(self.path, "rb")
        if self.temporary:
            self.path.unlink(missing_ok=True)
        return handle

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "model": self.model, "format": self.format, "size": self.size,
                "sha256": self.sha256, "content_digest": self.content_digest, "bundle": self.bundle}


def export_file_name(*, model: RegisteredModel, fmt: str, bundle: bool) -> str:
    stem = Path(model.file_name).stem if model.file_name else model.name
    name = f"{stem}{WeightFormat.extension(fmt)}"
    return f"{stem}.{fmt}.tar" if bundle else name


def _refuse_changed_on_disk(model: RegisteredModel, fmt: str, cached: WeightFile) -> DigestMismatchError:
    """Mark a cached file whose bytes no longer hash to its record corrupt; the error that refuses its export."""
    weight_mark_corrupt(weight_file=cached, reason="sha256 changed since it was recorded (found on export)")
    return DigestMismatchError(f"the cached {fmt} file of {model.name} changed on disk since it was recorded; "
                               "it is marked corrupt, and another try exports a healthy copy if there is one",
                               extra={"kind": "changed_on_disk", "model": model.name, "format": fmt})


def _open_checked(model: RegisteredModel, fmt: str, cached: WeightFile) -> BinaryIO | None:
    """The cached file opened for streaming, its bytes hashed through that same handle and equal to the record's
    sha256; None when it is absent or its size differs (the caller then exports by copying, which refuses it).

    Always hashed (85 MB to 1.3 GB, about 1 s per GB): bit rot changes no inode time, and an export hands the
    bytes out under this sha256, so no record may vouch for them unread."""
    try:
        handle = open(cachefs.absolute(cached.path), "rb")
    except FileNotFoundError:
        return None
    try:
        if os.fstat(handle.fileno()).st_size != cached.size:
            handle.close()
            return None
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    except BaseException:
        handle.close()
        raise
    if sha256 != cached.sha256:
        handle.close()
        raise _refuse_changed_on_disk(model, fmt, cached)
    handle.seek(0)
    return handle


def _write_weights_file(model: RegisteredModel, fmt: str, dest: Path) -> tuple[str, str, WeightFile]:
    """Write the model's weights in `fmt` to `dest` (temporary path); (sha256, content digest, the cached file
    whose weights were written)."""
    cached = weight_file_get(model=model, fmt=fmt)
    if (cached is not None and cached.health in Health.USABLE and cachefs.absolute(cached.path).exists()
            and not weight_pin_problem(model=model, weight_file=cached)):
        sha256 = cachefs.copy_with_sha256(cachefs.absolute(cached.path), dest)
        if sha256 != cached.sha256:
            raise _refuse_changed_on_disk(model, fmt, cached)
        return sha256, cached.content_digest, cached
    source, loaded = weights_load_usable(model=model)
    written = _write_converted(model, source, loaded, fmt, dest)
    return written.sha256, written.digest, source


def _bundle_manifest(model: RegisteredModel, fmt: str, member: str, size: int, sha256: str, digest: str,
                     origin: WeightFile) -> dict:
    provenance = origin.provenance
    if origin.format != fmt:
        provenance = {"kind": "convert", "source": f"the {origin.format} copy, sha256 {origin.sha256}",
                      "by": origin.origin_by, "at": timezone.now().isoformat(), "sha256": sha256,
                      "converted_from": provenance}
    return {
        "bundle_version": BUNDLE_VERSION,
        "model": model.name,
        "architecture": model.architecture,
        "format": fmt,
        "file": member,
        "size": size,
        "file_sha256": sha256,
        "content_digest": digest,
        # Only a URL these weights were really downloaded from; an imported file never claims the catalogue's.
        "source_url": _downloaded_from(origin),
        "provenance": provenance,
        "created": timezone.now().isoformat(),
        "depthsite_version": depthsite.__version__,
    }


def _downloaded_from(weight_file: WeightFile) -> str:
    return weight_file.origin_source if weight_file.origin == "download" else ""


def _write_export(model: RegisteredModel, fmt: str, bundle: bool, dest: Path) -> ExportResult:
    """Write the export (plain file or bundle) to `dest`, which is a temporary path."""
    if not bundle:
        sha256, digest, _ = _write_weights_file(model, fmt, dest)
        return ExportResult(dest, model.name, fmt, dest.stat().st_size, sha256, digest, False)
    member = export_file_name(model=model, fmt=fmt, bundle=False)
    inner = cachefs.temp_path_for(dest.with_name(member))
    try:
        sha256, digest, origin = _write_weights_file(model, fmt, inner)
        size = inner.stat().st_size
        manifest = _bundle_manifest(model, fmt, member, size, sha256, digest, origin)
        payload = json.dumps(manifest, indent=2).encode()
        with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as archive:
            info = tarfile.TarInfo(BUNDLE_MANIFEST)
            info.size, info.mtime, info.mode = len(payload), int(timezone.now().timestamp()), 0o644
            archive.addfile(info, io.BytesIO(payload))
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = size, int(timezone.now().timestamp()), 0o644
            with open(inner, "rb") as handle:
                archive.addfile(info, handle)
    finally:
        inner.unlink(missing_ok=True)
    return ExportResult(dest, model.name, fmt, dest.stat().st_size, file_sha256(dest), digest, True, manifest)


def weight_export(*, model: RegisteredModel, fmt: str, output: Path, bundle: bool = False,
                  force: bool = False) -> ExportResult:
    """Export a model's weights to a user path in a chosen format (or a bundle), atomically."""
    model_license_check(model=model)
    fmt = WeightFormat.parse(fmt).value
    output = Path(output).expanduser()
    if output.is_dir():
        output = output / export_file_name(model=model, fmt=fmt, bundle=bundle)
    if output.exists() and not force:
        raise ConflictError(f"{output} already exists and overwriting it was not asked for",
                            extra={"path": str(output), "kind": "exists"})
    if not output.parent.is_dir():
        raise InvalidRequestError(f"folder {output.parent} does not exist", extra={"field": "output"})
    with cachefs.atomic_write(output) as tmp:
        result = _write_export(model, fmt, bundle, tmp)
    result.path = output
    logger.info("exported %s as %s to %s", model.name, "bundle" if bundle else fmt, output)
    return result


def weight_export_artifact(*, model: RegisteredModel, fmt: str, bundle: bool = False,
                           node: str | None = None) -> ExportResult:
    """A file to stream to a browser: the cached file itself when possible, else a fresh file under .exports/.
    Either way its bytes were hashed here: DigestMismatchError (and the copy marked corrupt) for a cached file
    that changed on disk since it was recorded.

    `node`: the node the caller means (a selected row's); ConflictError unless it is this one, whose copy is read."""
    node_check(node=node or "", action="export", model=model.name, fmt=fmt)
    model_license_check(model=model)
    fmt = WeightFormat.parse(fmt).value
    cached = weight_file_get(model=model, fmt=fmt)
    if (not bundle and cached is not None and cached.health in Health.USABLE
            and not weight_pin_problem(model=model, weight_file=cached)):
        handle = _open_checked(model, fmt, cached)
        if handle is not None:
            path = cachefs.absolute(cached.path)
            return ExportResult(path, model.name, fmt, cached.size, cached.sha256, cached.content_digest, False,
                                download_name=path.name, checked_handle=handle)
    # Temporary by name, so `models optimize` removes exports that a caller never cleaned up.
    name = export_file_name(model=model, fmt=fmt, bundle=bundle)
    folder = cachefs.cache_root() / ".exports"
    folder.mkdir(exist_ok=True)
    dest = cachefs.temp_path_for(folder / name)
    with cachefs.atomic_write(dest) as tmp:
        result = _write_export(model, fmt, bundle, tmp)
    result.path = dest
    result.download_name = name
    result.temporary = True
    return result
