"""Weight files in the cache: inspect, record, verify, convert, export, import and mark used."""
from __future__ import annotations

import io
import json
import logging
import mmap
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from django.db import transaction
from django.utils import timezone

import depthsite
from models_registry import cachefs
from models_registry.catalogue import ARCHITECTURES, key_layout
from models_registry.choices import Health, RuntimeFormat, WeightFormat
from depthsite.exceptions import (
    ConflictError,
    DiskFullError,
    DigestMismatchError,
    NotFoundError,
    TooLargeError,
    InvalidRequestError,
    WeightFileError,
)
from models_registry.formats import (
    BUNDLE,
    LoadedWeights,
    content_digest,
    extension_format,
    file_sha256,
    read_weights,
    sniff_format,
    write_weights,
)
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import model_get, weight_file_get, weight_files, weight_files_usable
from models_registry.services.licences import model_license_check

logger = logging.getLogger(__name__)

T = TypeVar("T")

BUNDLE_MANIFEST = "manifest.json"
BUNDLE_VERSION = 1
# Formats tried first as a conversion source: the ones that load fastest.
SOURCE_PREFERENCE = ("safetensors", "pt", "h5", "pkl")


def best_first(files: Iterable[WeightFile]) -> list[WeightFile]:
    """Cached files in the order they are loaded from: verified ok before unverified, then by format
    (SOURCE_PREFERENCE: the cheapest to read first)."""
    return sorted(files, key=lambda f: (f.health != Health.OK, SOURCE_PREFERENCE.index(f.format)))

# A functional check builds the architecture, loads the tensors strictly, runs a fixed tiny input and
# returns a hash of the output. The inference app registers one; the registry never imports inference. The
# caller passes the tensors' content digest it already computed (the check may key a memo on it).
FunctionalCheck = Callable[..., str]  # (model, arrays, *, digest: str | None) -> output hash
_functional_checks: list[FunctionalCheck] = []


def functional_check_register(check: FunctionalCheck) -> None:
    if check not in _functional_checks:
        _functional_checks.append(check)


# --- inspection ----------------------------------------------------------------------------------


@dataclass
class Inspection:
    path: Path
    format: str
    size: int
    sha256: str
    loaded: LoadedWeights
    digest: str

    @property
    def dtype(self) -> str:
        return self.loaded.dtype


def _describe_mismatch(architecture: str, mismatch: dict[str, list]) -> str:
    parts = []
    if mismatch["missing"]:
        parts.append(f"{len(mismatch['missing'])} missing ({', '.join(mismatch['missing'][:3])}"
                     f"{', ...' if len(mismatch['missing']) > 3 else ''})")
    if mismatch["unexpected"]:
        parts.append(f"{len(mismatch['unexpected'])} unexpected ({', '.join(mismatch['unexpected'][:3])}"
                     f"{', ...' if len(mismatch['unexpected']) > 3 else ''})")
    if mismatch["wrong_shape"]:
        key, expected, found = mismatch["wrong_shape"][0]
        parts.append(f"{len(mismatch['wrong_shape'])} with the wrong shape ({key}: expected {expected}, found {found})")
    return f"keys do not match the official {architecture} layout: " + "; ".join(parts)


def weights_inspect(*, path: Path, architecture: str | None = None, fmt: str | None = None) -> Inspection:
    """Sniff, hash, load safely and digest a weight file; check its layout when the architecture is known."""
    path = Path(path)
    loaded = read_weights(path, fmt, architecture=architecture)
    if architecture:
        mismatch = key_layout(architecture).mismatches(loaded.shapes)
        if any(mismatch.values()):
            raise WeightFileError(_describe_mismatch(architecture, mismatch),
                                  extra={"kind": "layout_mismatch", **{k: v[:20] for k, v in mismatch.items()}})
    digest = content_digest(loaded.arrays)
    declared = loaded.metadata.get("content_digest")
    if declared and declared != digest:
        raise WeightFileError(
            f"{path.name} declares content digest {declared[:16]}... but its tensors hash to {digest[:16]}...: "
            "the file was altered after it was written",
            extra={"kind": "digest_mismatch"},
        )
    return Inspection(path=path, format=loaded.format, size=path.stat().st_size, sha256=file_sha256(path),
                      loaded=loaded, digest=digest)


def architecture_identify(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return [arch for arch in ARCHITECTURES if key_layout(arch).matches(shapes)]


def model_identify(*, inspection: Inspection) -> RegisteredModel:
    """The registered model whose official key layout the weights have; refuses when none or several match."""
    pinned = list(RegisteredModel.objects.filter(expected_content_digest=inspection.digest, enabled=True))
    if len(pinned) == 1:
        return pinned[0]
    architectures = architecture_identify(inspection.loaded.shapes)
    if not architectures:
        raise WeightFileError(
            f"{inspection.path.name} does not have the key layout of any known MiDaS architecture "
            f"({', '.join(ARCHITECTURES)}); naming the model it is meant for shows what differs",
            extra={"kind": "unknown_layout"},
        )
    candidates = list(RegisteredModel.objects.filter(architecture__in=architectures, enabled=True))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WeightFileError(f"the weights have the {architectures[0]} layout but no enabled model uses it",
                              extra={"kind": "unknown_layout"})
    names = ", ".join(model.name for model in candidates)
    raise InvalidRequestError(f"the weights fit several models ({names}); say which one they are for",
                          extra={"field": "model", "kind": "ambiguous_model",
                                 "candidates": [model.name for model in candidates]})


def weights_functional_check(model: RegisteredModel, loaded: LoadedWeights, *, digest: str | None = None) -> str:
    result = ""
    for check in _functional_checks:
        try:
            result = check(model, loaded.arrays, digest=digest)
        except WeightFileError:
            raise
        except Exception as exc:  # a network that cannot run these weights is a corrupt file, not a crash
            raise WeightFileError(f"the network failed to run these weights: {type(exc).__name__}: {exc}",
                                  extra={"kind": "functional"}) from exc
    return result


# --- records -------------------------------------------------------------------------------------


def cache_file_path(*, model: RegisteredModel, fmt: str) -> Path:
    stem = Path(model.file_name).stem if model.file_name else model.name
    return cachefs.model_dir(model.name) / f"{stem}{WeightFormat.extension(fmt)}"


def _file_metadata(model: RegisteredModel, digest: str, **extra: str) -> dict[str, str]:
    return {
        "model": model.name,
        "architecture": model.architecture,
        "content_digest": digest,
        "depthsite_version": depthsite.__version__,
        **extra,
    }


def weight_record(
    *,
    model: RegisteredModel,
    fmt: str,
    path: Path,
    inspection: Inspection,
    health: str = Health.OK,
    reason: str = "",
    functional_hash: str = "",
    origin: str = "",
    origin_source: str = "",
    origin_by: str = "",
) -> WeightFile:
    """Create or replace the record of a file that is already in its final place in the cache.

    `origin` (download, import, convert), `origin_source` and `origin_by` record where its bytes came from."""
    values = {
        "origin": origin,
        "origin_source": origin_source[:500],
        "origin_by": origin_by[:150],
        "path": cachefs.relative(path),
        "size": inspection.size,
        "sha256": inspection.sha256,
        "content_digest": inspection.digest,
        "dtype": inspection.dtype,
        "health": health,
        "health_reason": reason,
        "functional_hash": functional_hash,
        "license": model.license,
        "verified_at": timezone.now(),
        "created_at": timezone.now(),
    }
    weight_file, _ = WeightFile.objects.update_or_create(
        model=model, format=fmt, node=cachefs.node_name(), defaults=values
    )
    return weight_file


def weight_mark_used(*, weight_file: WeightFile) -> None:
    now = timezone.now()
    WeightFile.objects.filter(pk=weight_file.pk).update(last_used_at=now)
    weight_file.last_used_at = now


def weight_mark_corrupt(*, weight_file: WeightFile, reason: str) -> WeightFile:
    weight_file.set_health(Health.CORRUPT, reason)
    weight_file.save(update_fields=["health", "health_reason", "verified_at"])
    logger.warning("%s marked corrupt: %s", weight_file, reason)
    return weight_file


def weight_pin_problem(*, model: RegisteredModel, weight_file: WeightFile) -> str:
    """Why a cached copy cannot be proven to hold the model's pinned weights ('' when it can).

    A pinned sha256 names one released file: a pt copy proves itself by that sha256, any other copy
    only by the content digest recorded from a file that had it. Without that digest nothing else
    is proven, so nothing else is served.
    """
    if not model.expected_sha256 and not model.expected_content_digest:
        return ""
    if weight_file.format == WeightFormat.PT and model.expected_sha256 and weight_file.sha256 == model.expected_sha256:
        return ""
    if model.expected_content_digest:
        if weight_file.content_digest == model.expected_content_digest:
            return ""
        return (f"holds other weights than the pinned ones of {model.name} (content digest "
                f"{(weight_file.content_digest or '?')[:16]}..., pinned {model.expected_content_digest[:16]}...)")
    return (f"cannot be proven to hold the weights pinned for {model.name} (sha256 {model.expected_sha256[:16]}...): "
            "no cached file with that sha256 is known; download the pinned file again")


def weight_files_proven(*, model: RegisteredModel) -> list[WeightFile]:
    """Usable cached files of the model whose weights are proven to be the pinned ones."""
    return [f for f in weight_files_usable(model=model) if not weight_pin_problem(model=model, weight_file=f)]


# --- verify --------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    weight_file: WeightFile
    health: str
    reason: str
    path: str

    @property
    def ok(self) -> bool:
        return self.health == Health.OK

    @property
    def summary(self) -> str:
        """One line for people: "MiDaS_small [pt]: corrupt - why"."""
        line = self.weight_file.label(self.health)
        return f"{line} - {self.reason}" if self.reason else line

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.weight_file.model.name,
            "format": self.weight_file.format,
            "path": self.path,
            "health": self.health,
            "reason": self.reason,
            "sha256": self.weight_file.sha256,
            "functional_hash": self.weight_file.functional_hash,
        }


def weight_quick_problem(weight_file: WeightFile, path: Path) -> tuple[str, str] | None:
    """(health, reason) when a recorded file is visibly unusable, else None. Cheap (a stat and a sniff of its
    first bytes, no hashing): the resolution chain runs it before every load; `models verify` starts with it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Health.MISSING, (f"file not found at {path}: download or import {weight_file.model.name} again, "
                                "or run `models optimize` to drop the record")
    try:
        sniffed = sniff_format(path)
    except WeightFileError as exc:
        return Health.CORRUPT, exc.message
    claimed = extension_format(path)
    if sniffed != weight_file.format or (claimed and claimed != sniffed):
        return Health.CORRUPT, (f"{path.name} holds {sniffed} content but is recorded as {weight_file.format}"
                                f"{f' and named {path.suffix}' if claimed and claimed != sniffed else ''}; "
                                "it was overwritten by another file")
    if size != weight_file.size:
        return Health.CORRUPT, (f"{path.name} has {size} bytes but {weight_file.size} were recorded: "
                                "the file was truncated or replaced")
    return None


def _verify_problems(weight_file: WeightFile, path: Path) -> tuple[str, str, Inspection | None]:
    """(health, reason, inspection) of a recorded file, checking everything `models verify` promises."""
    quick = weight_quick_problem(weight_file, path)
    if quick is not None:
        return (*quick, None)
    try:
        inspection = weights_inspect(path=path, architecture=weight_file.model.architecture, fmt=weight_file.format)
    except WeightFileError as exc:
        return Health.CORRUPT, exc.message, None
    if inspection.sha256 != weight_file.sha256:
        return Health.CORRUPT, (f"{path.name} sha256 {inspection.sha256[:16]}... differs from the recorded "
                                f"{weight_file.sha256[:16]}...: the file changed after it was cached"), inspection
    if weight_file.content_digest and inspection.digest != weight_file.content_digest:
        return Health.CORRUPT, "content digest differs from the record", inspection
    problem = weight_pin_problem(model=weight_file.model, weight_file=weight_file)
    if problem:
        return Health.CORRUPT, f"{path.name} {problem}", inspection
    return Health.OK, "", inspection


def node_check(*, node: str, action: str, model: str = "", fmt: str = "") -> None:
    """ConflictError (409) when `node` is not this one: a node's cache is only changed on that node's machine,
    and the message says where and how to run the action instead."""
    here = cachefs.node_name()
    if not node or node == here:
        return
    options = (f" --model {model}" if model else "") + (f" --format {fmt}" if fmt else "")
    command = f"DEPTHSITE_NODE={node} python manage.py models {action}{options}"
    what = f"{model} [{fmt}]" if model and fmt else (model or "that cache")
    raise ConflictError(
        f"{what} is on node {node}, not on this node ({here}): {action} it on that machine with `{command}`",
        extra={"node": node, "this_node": here, "command": command,
               "hint": f"run `{command}` on the machine of node {node}"})


def _artifact_problem(weight_file: WeightFile, path: Path) -> tuple[str, str]:
    """A runtime artifact's bytes against its record; its output was compared with eager when it was built."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Health.MISSING, f"file not found at {path}"
    if size != weight_file.size or file_sha256(path) != weight_file.sha256:
        return Health.CORRUPT, (f"{path.name} is not the artifact that was built and checked (size or sha256 "
                                "changed); it is rebuilt on next use")
    return Health.OK, weight_file.health_reason if weight_file.health == Health.OK else ""


def weight_verify(*, weight_file: WeightFile, functional: bool = True) -> VerifyResult:
    """Check one recorded file of this node; ConflictError for another node's record (its file is not here)."""
    node_check(node=weight_file.node, action="verify", model=weight_file.model.name, fmt=weight_file.format)
    path = cachefs.absolute(weight_file.path)
    if weight_file.format in RuntimeFormat.values:
        health, reason = _artifact_problem(weight_file, path)
        if health == Health.OK and weight_file.health != Health.OK:
            health, reason = weight_file.health, weight_file.health_reason  # bytes intact, but it failed its check
        weight_file.set_health(health, reason)
        weight_file.save(update_fields=["health", "health_reason", "verified_at"])
        return VerifyResult(weight_file=weight_file, health=health, reason=reason, path=str(path))
    health, reason, inspection = _verify_problems(weight_file, path)
    if health == Health.OK and functional and inspection is not None:
        try:
            weight_file.functional_hash = weights_functional_check(weight_file.model, inspection.loaded,
                                                                   digest=inspection.digest)
        except WeightFileError as exc:
            health, reason = Health.CORRUPT, exc.message
    weight_file.set_health(health, reason)
    weight_file.save(update_fields=["health", "health_reason", "verified_at", "functional_hash"])
    if health != Health.OK:
        logger.info("verify %s: %s: %s", weight_file, health, reason)
    return VerifyResult(weight_file=weight_file, health=health, reason=reason, path=str(path))


def weights_verify(*, model: RegisteredModel | None = None, fmt: str | None = None,
                   functional: bool = True) -> list[VerifyResult]:
    queryset = weight_files(model=model)
    if fmt:
        queryset = queryset.filter(format=fmt)
    return [weight_verify(weight_file=weight_file, functional=functional) for weight_file in queryset]


# --- convert -------------------------------------------------------------------------------------


def _best_source(model: RegisteredModel, exclude: Iterable[str] = ()) -> WeightFile:
    files = [f for f in weight_files_proven(model=model) if f.format not in exclude]
    if not files:
        raise NotFoundError(
            f"no healthy cached weights of {model.name} on this node; download or import them first "
            f"(python manage.py models download --model {model.name})",
            extra={"model": model.name},
        )
    return best_first(files)[0]


def weights_first_usable(*, model: RegisteredModel, pick: Callable[[], WeightFile],
                         use: Callable[[WeightFile], T], rounds: int = len(SOURCE_PREFERENCE) + 1) -> tuple[WeightFile, T]:
    """`use` applied to the file `pick` chooses; a file that fails there (WeightFileError, or the OS cannot read
    it) is marked corrupt, so the next `pick` passes it over. The one "try the next file" loop: loading,
    converting and building an estimator all go through it."""
    last_error = ""
    for _ in range(rounds):
        weight_file = pick()
        try:
            return weight_file, use(weight_file)
        except (WeightFileError, OSError) as exc:
            last_error = getattr(exc, "message", None) or str(exc)
            weight_mark_corrupt(weight_file=weight_file, reason=last_error)
    raise WeightFileError(f"no cached file of {model.name} is usable (last error: {last_error}); "
                          f"run python manage.py models verify --model {model.name}",
                          extra={"model": model.name, "kind": "none_usable"})


def weights_read(weight_file: WeightFile) -> LoadedWeights:
    """The tensors of one cached file (WeightFileError or OSError when they do not load)."""
    return read_weights(cachefs.absolute(weight_file.path), weight_file.format,
                        architecture=weight_file.model.architecture)


def weights_load_usable(*, model: RegisteredModel, exclude: Iterable[str] = ()) -> tuple[WeightFile, LoadedWeights]:
    """The first healthy cached file that really loads (formats in `exclude` left out)."""
    return weights_first_usable(model=model, pick=lambda: _best_source(model, exclude=exclude), use=weights_read)


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


# --- export --------------------------------------------------------------------------------------


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

    def open(self):
        """A read handle; a temporary export is unlinked at once (the open handle keeps its bytes alive)."""
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


def _write_weights_file(model: RegisteredModel, fmt: str, dest: Path) -> tuple[str, str, WeightFile]:
    """Write the model's weights in `fmt` to `dest` (temporary path); (sha256, content digest, the cached file
    whose weights were written)."""
    cached = weight_file_get(model=model, fmt=fmt)
    if (cached is not None and cached.health in Health.USABLE and cachefs.absolute(cached.path).exists()
            and not weight_pin_problem(model=model, weight_file=cached)):
        sha256 = cachefs.copy_with_sha256(cachefs.absolute(cached.path), dest)
        if sha256 != cached.sha256:
            weight_mark_corrupt(weight_file=cached, reason="sha256 changed since it was recorded (found on export)")
            raise DigestMismatchError(f"the cached {fmt} file of {model.name} changed on disk; run `models verify`")
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


def weight_export_artifact(*, model: RegisteredModel, fmt: str, bundle: bool = False) -> ExportResult:
    """A file to stream to a browser: the cached file itself when possible, else a fresh file under .exports/."""
    model_license_check(model=model)
    fmt = WeightFormat.parse(fmt).value
    cached = weight_file_get(model=model, fmt=fmt)
    if (not bundle and cached is not None and cached.health in Health.USABLE
            and not weight_pin_problem(model=model, weight_file=cached)):
        path = cachefs.absolute(cached.path)
        if path.exists() and path.stat().st_size == cached.size:
            return ExportResult(path, model.name, fmt, cached.size, cached.sha256, cached.content_digest, False,
                                download_name=path.name)
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


# --- import --------------------------------------------------------------------------------------


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


def _bad_bundle(path: Path, why: str) -> WeightFileError:
    return WeightFileError(f"{path.name}: {why}", extra={"kind": "bad_bundle"})


def _bundle_members(path: Path, archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The bundle's members, read one header at a time: a few regular files, none sparse."""
    members: dict[str, tarfile.TarInfo] = {}
    while True:
        member = archive.next()
        if member is None:
            return members
        if len(members) >= BUNDLE_MAX_MEMBERS:
            raise _bad_bundle(path, f"more than {BUNDLE_MAX_MEMBERS} members; a bundle holds a manifest and one file")
        sparse = (member.type == tarfile.GNUTYPE_SPARSE or member.sparse is not None
                  or any(key.startswith("GNU.sparse") for key in member.pax_headers))
        if sparse:
            raise _bad_bundle(path, f"member {member.name!r} is a sparse file; a bundle holds regular files only")
        if not member.isreg():
            raise _bad_bundle(path, f"member {member.name!r} is not a regular file")
        members[member.name] = member


def _bundle_extract(path: Path, workdir: Path) -> tuple[Path, dict]:
    """Read a bundle's manifest and copy its one weight file out (no extractall: member names are untrusted).

    Sizes are checked against the import limit and the free disk before a byte is written, and the copy
    gets a name of its own, so concurrent imports never write into a file another one has mapped.
    """
    from django.conf import settings

    with open(path, "rb") as handle:
        # tarfile reads a PAX or long-name header whole at the size it declares; from a map, a read
        # never returns (or allocates) more than the file holds.
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        archive = tarfile.open(fileobj=data, mode="r:")
    except (tarfile.TarError, ValueError, MemoryError) as exc:
        data.close()
        raise WeightFileError(f"{path.name}: damaged bundle: {exc}", extra={"kind": "bad_bundle"}) from None
    with data, archive:
        try:
            members = _bundle_members(path, archive)
        except (tarfile.TarError, ValueError, MemoryError) as exc:
            raise _bad_bundle(path, f"damaged bundle: {exc}") from None
        manifest_member = members.get(BUNDLE_MANIFEST)
        if manifest_member is None:
            raise WeightFileError(f"{path.name}: not a depthsite bundle (no manifest.json)", extra={"kind": "bad_bundle"})
        if manifest_member.size > BUNDLE_MAX_MANIFEST:
            raise _bad_bundle(path, f"its manifest has {manifest_member.size} bytes (at most {BUNDLE_MAX_MANIFEST})")
        try:
            manifest = json.loads(archive.extractfile(manifest_member).read(BUNDLE_MAX_MANIFEST))
            member = members[manifest["file"]]
        except (ValueError, KeyError, TypeError, tarfile.TarError):
            raise WeightFileError(f"{path.name}: the bundle's manifest is unreadable or names a missing file",
                                  extra={"kind": "bad_bundle"}) from None
        if not isinstance(manifest, dict) or member is manifest_member:
            raise _bad_bundle(path, "the bundle's manifest does not name a weight file")
        limit = settings.DEPTHSITE_MAX_IMPORT_BYTES
        if limit and member.size > limit:
            raise TooLargeError(
                f"{path.name}: its weight file has {member.size} bytes, over the import limit of {limit} "
                "(DEPTHSITE_MAX_IMPORT_BYTES)", extra={"size": member.size, "limit": limit})
        if member.offset_data + member.size > path.stat().st_size:
            raise _bad_bundle(path, f"member {member.name!r} extends past the end of the bundle")
        free = cachefs.disk_free(workdir)
        if member.size > free:
            raise DiskFullError(f"{path.name}: extracting {member.size} bytes needs more than the {free} bytes "
                                f"free under {workdir}; free some space (models optimize) and try again",
                                extra={"size": member.size, "free": free})
        target = cachefs.temp_path_for(workdir / f"bundle-{Path(member.name).name}")
        try:
            with cachefs.disk_full_as_error(target), archive.extractfile(member) as reader, \
                    open(target, "xb") as writer:
                remaining = member.size
                while remaining > 0:
                    chunk = reader.read(min(cachefs.COPY_CHUNK, remaining))
                    if not chunk:
                        raise _bad_bundle(path, f"member {member.name!r} is shorter than its header says")
                    writer.write(chunk)
                    remaining -= len(chunk)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    return target, manifest


def weight_import(*, path: Path, model_name: str | None = None, original_name: str = "", imported_by: str = "",
                  pin: bool = True) -> ImportResult:
    """Import a weight file or bundle: format by content, model by layout, verified, copied into the cache.

    The record says it was imported from `original_name` (default the file's name) by `imported_by` (a user
    name; default 'cli'). `pin` (default) pins the imported weights for a model that has no pin yet: a pt file
    pins its sha256, size and content digest (it may be the released file); another format pins the content
    digest only, so the released .pt is still accepted when it holds the same weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file", extra={"field": "path"})
    kind = sniff_format(path)
    extracted: Path | None = None
    manifest: dict = {}
    try:
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
                raise DigestMismatchError(f"{path.name}: the weight file's sha256 differs from the bundle manifest")
            if manifest.get("content_digest") and manifest["content_digest"] != inspection.digest:
                raise DigestMismatchError(f"{path.name}: the weights' content digest differs from the bundle manifest")
        if model is None:
            model = model_identify(inspection=inspection)
        return _import_inspected(model, inspection, origin=path, original_name=original_name or path.name,
                                 imported_by=imported_by or "cli", pin=pin)
    finally:
        if extracted is not None:
            extracted.unlink(missing_ok=True)


def _import_inspected(model: RegisteredModel, inspection: Inspection, *, origin: Path, original_name: str,
                      imported_by: str, pin: bool) -> ImportResult:
    model_license_check(model=model)
    if model.expected_content_digest and inspection.digest != model.expected_content_digest:
        raise DigestMismatchError(
            f"the weights in {origin.name} differ from the pinned weights of {model.name} "
            f"(content digest {inspection.digest[:16]}..., pinned {model.expected_content_digest[:16]}...); "
            f"to accept them, reset the pin: python manage.py models pin --model {model.name} --reset",
            extra={"found": inspection.digest, "pinned": model.expected_content_digest},
        )
    fmt = inspection.format
    proves_pin = (fmt == WeightFormat.PT and bool(model.expected_sha256)
                  and inspection.sha256 == model.expected_sha256)
    if model.expected_sha256 and not model.expected_content_digest and not proves_pin:
        raise DigestMismatchError(
            f"{model.name} is pinned to sha256 {model.expected_sha256[:16]}... and {origin.name} is not that file "
            f"(sha256 {inspection.sha256[:16]}...), so its weights cannot be proven to be the pinned ones; import "
            f"the pinned .pt file, or change the pin: python manage.py models pin --model {model.name} --reset",
            extra={"found": inspection.sha256, "pinned": model.expected_sha256},
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
                raise DigestMismatchError(f"{origin.name} changed while it was being imported; try again")
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
    return ImportResult(weight_file, True, f"imported {model.name} [{fmt}] from {origin.name} "
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
