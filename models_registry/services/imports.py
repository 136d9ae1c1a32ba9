"""Import a weight file or a bundle into the cache: extract safely, identify, check against the pin, record."""
from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import transaction
from django.utils import timezone

from depthsite.exceptions import (
    ApplicationError,
    DigestMismatchError,
    DiskFullError,
    NotFoundError,
    TooLargeError,
    WeightFileError,
)
from models_registry import cachefs
from models_registry.choices import Health, WeightFormat
from models_registry.formats import BUNDLE, sniff_format
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import model_get, weight_file_get
from models_registry.services.export import BUNDLE_MANIFEST
from models_registry.services.inspection import Inspection, model_identify, weights_functional_check, weights_inspect
from models_registry.services.licences import model_license_check
from models_registry.services.records import (
    cache_file_path,
    resource_error_code,
    weight_record,
    weights_unavailable_now,
)

logger = logging.getLogger(__name__)


@dataclass
class ImportResult:
    weight_file: WeightFile
    created: bool
    message: str
    pinned: bool = False  # this import pinned the model's weights

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.weight_file.model.name, "format": self.weight_file.format,
                "created": self.created, "message": self.message, "sha256": self.weight_file.sha256,
                "content_digest": self.weight_file.content_digest, "path": self.weight_file.path,
                "pinned": self.pinned, "provenance": self.weight_file.provenance}


BUNDLE_MAX_MEMBERS = 16
BUNDLE_MAX_MANIFEST = 64 * 1024


# The manifest fields an import reads, each a string when present ("file" must be): JSON allows any value, and
# a list where a name was expected would fail deep inside the import instead of naming the field.
MANIFEST_STRINGS = ("file", "model", "file_sha256", "content_digest")


# A member's name is untrusted and may be as long as its PAX header: messages quote at most this much of it.
MEMBER_NAME_SHOWN = 200


def _member_shown(name: str) -> str:
    """A member's name as messages quote it: repr'd, at most MEMBER_NAME_SHOWN characters of it."""
    if len(name) <= MEMBER_NAME_SHOWN:
        return repr(name)
    return f"{name[:MEMBER_NAME_SHOWN]!r}... ({len(name)} characters)"


def _bad_bundle(path: Path, why: str, **extra) -> WeightFileError:
    return WeightFileError(f"{path.name}: {why}", extra={"kind": "bad_bundle", **extra}, file=path.name)


def _bundle_members(path: Path, archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The bundle's members, read one header at a time: a few regular files, none sparse, no name twice.

    Every header counts, not every distinct name: tarfile keeps each header it reads (a bundle of a million
    empty members under one name would cost gigabytes), and of two members under one name, which one is
    "the" file would depend on the reader.
    """
    members: dict[str, tarfile.TarInfo] = {}
    headers = 0
    while (member := archive.next()) is not None:
        headers += 1
        if headers > BUNDLE_MAX_MEMBERS:
            raise _bad_bundle(path, f"more than {BUNDLE_MAX_MEMBERS} members; a bundle holds a manifest and one file")
        if member.name in members:
            raise _bad_bundle(path, f"member {_member_shown(member.name)} appears twice; a bundle holds each file once")
        sparse = (member.type == tarfile.GNUTYPE_SPARSE or member.sparse is not None
                  or any(key.startswith("GNU.sparse") for key in member.pax_headers))
        if sparse:
            raise _bad_bundle(path, f"member {_member_shown(member.name)} is a sparse file; a bundle holds regular "
                                    "files only")
        if not member.isreg():
            raise _bad_bundle(path, f"member {_member_shown(member.name)} is not a regular file")
        members[member.name] = member
    return members


def _bundle_manifest_check(path: Path, manifest: Any) -> dict:
    """The manifest as a dict whose fields the import reads are strings (`file` present), or WeightFileError."""
    if not isinstance(manifest, dict):
        raise _bad_bundle(path, f"the bundle's manifest is a JSON {type(manifest).__name__}, not an object")
    if "file" not in manifest:
        raise _bad_bundle(path, "the bundle's manifest does not name its weight file (no 'file' field)", field="file")
    for field in MANIFEST_STRINGS:
        value = manifest.get(field)
        if value is not None and not isinstance(value, str):
            raise _bad_bundle(path, f"the bundle's manifest field {field!r} is a JSON {type(value).__name__}, "
                                    "not a string", field=field)
    return manifest


def _bundle_extract(path: Path, workdir: Path) -> tuple[Path, dict]:
    """Read a bundle's manifest and copy its one weight file out (no extractall: member names are untrusted).

    Sizes are checked against the import limit and the free disk before a byte is written, and the copy
    gets a name of its own, so concurrent imports never write into a file another one has mapped. That name
    is fixed (`.tmp-<hex>-bundle`): no part of a member's name is ever part of a path (weights are identified by
    their content, not by a name's extension). An OSError while copying is a full disk (DiskFullError), a
    shortage of the moment (WeightsUnavailableNowError, 503) or else a bundle that cannot be extracted (422).
    """
    from django.conf import settings

    with open(path, "rb") as handle:
        # tarfile reads a PAX or long-name header whole at the size it declares; from a map, a read
        # never returns (or allocates) more than the file holds.
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    # A member may be preceded by a chain of long-name or PAX headers, which tarfile reads recursively: a
    # long chain ends in RecursionError, a damaged bundle like any other.
    try:
        archive = tarfile.open(fileobj=data, mode="r:")
    except (tarfile.TarError, ValueError, MemoryError, RecursionError) as exc:
        data.close()
        raise _bad_bundle(path, f"damaged bundle: {exc}") from None
    with data, archive:
        try:
            members = _bundle_members(path, archive)
        except (tarfile.TarError, ValueError, MemoryError, RecursionError) as exc:
            raise _bad_bundle(path, f"damaged bundle: {exc}") from None
        manifest_member = members.get(BUNDLE_MANIFEST)
        if manifest_member is None:
            raise _bad_bundle(path, "not a depthsite bundle (no manifest.json)")
        if manifest_member.size > BUNDLE_MAX_MANIFEST:
            raise _bad_bundle(path, f"its manifest has {manifest_member.size} bytes (at most {BUNDLE_MAX_MANIFEST})")
        try:
            manifest = json.loads(archive.extractfile(manifest_member).read(BUNDLE_MAX_MANIFEST))
        except (ValueError, RecursionError, tarfile.TarError):
            raise _bad_bundle(path, "the bundle's manifest is unreadable (not JSON)") from None
        manifest = _bundle_manifest_check(path, manifest)
        member = members.get(manifest["file"])
        if member is None:
            raise _bad_bundle(path, f"the bundle's manifest names {_member_shown(manifest['file'])}, which it does "
                                    "not hold", field="file")
        if member is manifest_member:
            raise _bad_bundle(path, "the bundle's manifest does not name a weight file")
        limit = settings.DEPTHSITE_MAX_IMPORT_BYTES
        if limit and member.size > limit:
            raise TooLargeError(
                f"{path.name}: its weight file has {member.size} bytes, over the import limit of {limit} "
                "(DEPTHSITE_MAX_IMPORT_BYTES)", extra={"size": member.size, "limit": limit}, file=path.name)
        if member.offset_data + member.size > path.stat().st_size:
            raise _bad_bundle(path, f"member {_member_shown(member.name)} extends past the end of the bundle")
        free = cachefs.disk_free(workdir)
        if member.size > free:
            raise DiskFullError(f"{path.name}: extracting {member.size} bytes needs more than the {free} bytes "
                                f"free under {workdir}; free some space (models optimize) and try again",
                                extra={"size": member.size, "free": free}, file=path.name)
        target = cachefs.temp_path_for(workdir / "bundle")
        try:
            with cachefs.disk_full_as_error(target), archive.extractfile(member) as reader, \
                    open(target, "xb") as writer:
                remaining = member.size
                while remaining > 0:
                    chunk = reader.read(min(cachefs.COPY_CHUNK, remaining))
                    if not chunk:
                        raise _bad_bundle(path, f"member {_member_shown(member.name)} is shorter than its header says")
                    writer.write(chunk)
                    remaining -= len(chunk)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                target.unlink(missing_ok=True)
            if isinstance(exc, (OSError, tarfile.TarError)):  # no space left is already a DiskFullError
                raise _extract_error(path, member, exc) from exc
            raise
    return target, manifest


def _extract_error(path: Path, member: tarfile.TarInfo, exc: BaseException) -> ApplicationError:
    """What copying `member` out of the bundle failing with `exc` means, in words without a path."""
    code = resource_error_code(exc)
    if code is not None:
        return weights_unavailable_now(f"{path.name}: member {_member_shown(member.name)}", code,
                                       doing="extracted", file=path.name)
    why = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else type(exc).__name__
    return _bad_bundle(path, f"member {_member_shown(member.name)} cannot be extracted ({why})")


def weight_import(*, path: Path, model_name: str | None = None, original_name: str = "", imported_by: str = "",
                  pin: bool = True) -> ImportResult:
    """Import a weight file or bundle: format by content, model by layout, verified, copied into the cache.

    The record and every message name the file `original_name` (default the file's name: an upload's temporary
    name means nothing to its sender), imported by `imported_by` (a user name; default 'cli'). `pin` (default)
    pins the imported weights for a model that has no pin yet: a pt file pins its sha256, size and content
    digest (it may be the released file); another format pins the content digest only, so the released .pt is
    still accepted when it holds the same weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file", extra={"field": "path"})
    shown = original_name or path.name
    extracted: Path | None = None
    manifest: dict = {}
    try:
        kind = sniff_format(path)
        source = path
        if kind == BUNDLE:
            extracted, manifest = _bundle_extract(path, cachefs.cache_root())
            source = extracted
        model = model_get(name=model_name) if model_name else None
        if model is None and manifest.get("model"):
            try:
                model = model_get(name=manifest["model"])
            except NotFoundError:
                model = None
        inspection = weights_inspect(path=source, architecture=model.architecture if model else None)
        if manifest:
            if manifest.get("file_sha256") and manifest["file_sha256"] != inspection.sha256:
                raise DigestMismatchError(f"{shown}: the weight file's sha256 differs from the bundle manifest",
                                          file=shown)
            if manifest.get("content_digest") and manifest["content_digest"] != inspection.digest:
                raise DigestMismatchError(f"{shown}: the weights' content digest differs from the bundle manifest",
                                          file=shown)
        if model is None:
            model = model_identify(inspection=inspection)
        return _import_inspected(model, inspection, origin=path, original_name=shown,
                                 imported_by=imported_by or "cli", pin=pin)
    except ApplicationError as exc:
        # Errors name the files they read: the given file, or the weight file copied out of the bundle.
        if exc.file == path.name:
            exc.file_named(shown)
        elif extracted is not None and exc.file == extracted.name:
            exc.file_named(f"{shown}/{manifest['file'][:MEMBER_NAME_SHOWN]}"
                           + ("..." if len(manifest["file"]) > MEMBER_NAME_SHOWN else ""))
        raise
    finally:
        if extracted is not None:
            extracted.unlink(missing_ok=True)


def _import_inspected(model: RegisteredModel, inspection: Inspection, *, origin: Path, original_name: str,
                      imported_by: str, pin: bool) -> ImportResult:
    model_license_check(model=model)
    if model.expected_content_digest and inspection.digest != model.expected_content_digest:
        raise DigestMismatchError(
            f"the weights in {original_name} differ from the pinned weights of {model.name} "
            f"(content digest {inspection.digest[:16]}..., pinned {model.expected_content_digest[:16]}...)",
            extra={"kind": "pin_differs", "model": model.name, "found": inspection.digest,
                   "pinned": model.expected_content_digest},
        )
    fmt = inspection.format
    proves_pin = (fmt == WeightFormat.PT and bool(model.expected_sha256)
                  and inspection.sha256 == model.expected_sha256)
    if model.expected_sha256 and not model.expected_content_digest and not proves_pin:
        raise DigestMismatchError(
            f"{model.name} is pinned to sha256 {model.expected_sha256[:16]}... and {original_name} is not that file "
            f"(sha256 {inspection.sha256[:16]}...), so its weights cannot be proven to be the pinned ones; import "
            "the pinned .pt file",
            extra={"kind": "pin_differs", "model": model.name, "found": inspection.sha256,
                   "pinned": model.expected_sha256},
        )
    with cachefs.locked(model.name):
        existing = weight_file_get(model=model, fmt=fmt)
        model.refresh_from_db()  # another import may have pinned it while this one was inspected
        pin_now = pin and not model.expected_sha256 and not model.expected_content_digest
        if (existing is not None and existing.sha256 == inspection.sha256
                and cachefs.absolute(existing.path).exists() and existing.health == Health.OK):
            pinned = _import_pin(model, inspection, original_name, imported_by) if pin_now else False
            return ImportResult(existing, False,
                                f"{model.name} [{fmt}] is already cached with identical weights; nothing changed"
                                + ("; its weights are now pinned" if pinned else ""), pinned=pinned)
        functional_hash = weights_functional_check(model, inspection.loaded, digest=inspection.digest)
        dest = cache_file_path(model=model, fmt=fmt)
        with cachefs.atomic_write(dest) as tmp:
            copied_sha256 = cachefs.copy_with_sha256(inspection.path, tmp)
            if copied_sha256 != inspection.sha256:
                raise DigestMismatchError(f"{original_name} changed while it was being imported; try again",
                                          file=original_name)
        with transaction.atomic():
            weight_file = weight_record(model=model, fmt=fmt, path=dest, inspection=inspection,
                                        functional_hash=functional_hash, origin="import",
                                        origin_source=original_name, origin_by=imported_by)
            pinned = _import_pin(model, inspection, original_name, imported_by) if pin_now else False
            if proves_pin and not model.expected_content_digest:
                # The pinned file itself: its digest now proves copies in other formats.
                model.expected_content_digest = inspection.digest
                model.save(update_fields=["expected_content_digest", "updated_at"])
    logger.info("imported %s [%s] from %s", model.name, fmt, origin)
    return ImportResult(weight_file, True, f"imported {model.name} [{fmt}] from {original_name} "
                                           f"({inspection.size} bytes, sha256 {inspection.sha256[:16]}...)"
                                           + (f"; pinned its weights for {model.name}" if pinned else ""),
                        pinned=pinned)


def _import_pin(model: RegisteredModel, inspection: Inspection, original_name: str, imported_by: str) -> bool:
    """Pin an unpinned model to the imported weights, by the same rules as model_pin (see weight_import)."""
    from models_registry.services.catalogue import _unproven_copies_mark, model_pin

    source = f"import of {original_name} by {imported_by}"
    with transaction.atomic():
        if inspection.format == WeightFormat.PT:
            model_pin(model=model, sha256=inspection.sha256, size=inspection.size,
                      content_digest=inspection.digest, source=source)
        else:
            # Not the released file's format: its sha256 proves nothing about a .pt, the digest proves the weights.
            model.expected_content_digest = inspection.digest
            model.sha256_pinned_at = timezone.now()
            model.sha256_pinned_from = source
            model.save(update_fields=["expected_content_digest", "sha256_pinned_at", "sha256_pinned_from",
                                      "updated_at"])
            _unproven_copies_mark(model, reset=False)
    return True
