"""The photos of a batch request: uploaded files as they are, and the image members of one zip, unpacked after
the archive passed its checks. Nothing here imports torch.

A hostile archive is refused whole, before any job exists: encrypted members, symlinks, absolute or `..`
names, names listed twice, photos packed other than stored or deflate, more members or bytes than the limits
(its central directory counted before zipfile reads it), a compression ratio or an unpacked size
that gives it away as a zip bomb, damaged data. What is merely not a photo (a nested archive, a text file,
macOS `__MACOSX/` metadata, hidden files, folders) is skipped, and the batch lists it with the reason.
"""
from __future__ import annotations

import re
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO, Iterable, Sequence

from django.conf import settings
from django.core.files import File

from depthsite.units import format_size
from depthsite.exceptions import TooLargeError, InvalidRequestError

# Names a photo may have inside an archive; anything else is skipped with a reason (never decoded).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
NESTED_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst")
# A photo rarely deflates by more than a few times; a member this much smaller packed than unpacked (and over a
# megabyte unpacked, so a tiny flat picture may compress as it likes) is a bomb, refused before it is unpacked.
MAX_COMPRESSION_RATIO = 200
RATIO_FREE_BYTES = 1_000_000
# Only these are unpacked: zipfile bounds what each read of a stored or deflate member yields, while it hands a
# bzip2 or LZMA decompressor a whole compressed read with no limit on the output (a few hundred bytes of bzip2 can
# stand for hundreds of megabytes, allocated before a single byte could be counted). Every OS's zip tool writes
# photos with one of these two.
_SUPPORTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_CHUNK = 1024 * 1024
_END_OF_CENTRAL_DIRECTORY = b"PK\x05\x06"
_END_OF_CENTRAL_DIRECTORY_64 = b"PK\x06\x06"
_ZIP64_END_RECORDS_SIZE = 56 + 20  # the zip64 end record and its locator, between the directory and the end record
_CENTRAL_HEADER = b"PK\x01\x02"
_CENTRAL_HEADER_SIZE = 46  # then the name, the extra field and the comment, whose lengths it gives at offset 28
_CENTRAL_RECORD_MAX = _CENTRAL_HEADER_SIZE + 3 * 0xFFFF


def batch_max_files() -> int:
    return max(1, int(settings.DEPTHSITE_BATCH_MAX_FILES or 1))


def batch_max_bytes() -> int:
    return int(settings.DEPTHSITE_BATCH_MAX_BYTES or 0)


def _archive_max_members() -> int:
    """Entries an archive may list at all (skipped ones included): enough for folders and junk, and few enough
    that reading its directory costs nothing."""
    return 10 * batch_max_files() + 100


@dataclass
class BatchImages:
    """The photos of one batch request, in order, and the archive members skipped with why.

    Members are unpacked into temporary files that `close()` removes (the door calls it whatever happens)."""

    files: list[File] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "images" or "archive", per file: the field to blame
    skipped: list[dict] = field(default_factory=list)
    archive_name: str = ""
    _temporary: list[BinaryIO] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def size(self) -> int:
        return sum(int(upload.size or 0) for upload in self.files)

    def close(self) -> None:
        for handle in self._temporary:
            handle.close()
        self._temporary.clear()

    def __enter__(self) -> "BatchImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _too_many(count: int, *, field_name: str) -> InvalidRequestError:
    limit = batch_max_files()
    return InvalidRequestError(f"{field_name}: {count} photos; a batch takes at most {limit} (DEPTHSITE_BATCH_MAX_FILES)",
                           extra={"field": field_name, "kind": "too_many_files", "limit": limit, "count": count})


def _too_many_bytes(size: int, *, field_name: str, what: str = "the batch") -> TooLargeError:
    limit = batch_max_bytes()
    return TooLargeError(f"{field_name}: {what} is {format_size(size)}; a batch takes at most {format_size(limit)} "
                         "(DEPTHSITE_BATCH_MAX_BYTES)",
                         extra={"field": field_name, "kind": "too_many_bytes", "limit": limit, "size": size})


def _refused(message: str, *, kind: str, member: str = "") -> InvalidRequestError:
    extra = {"field": "archive", "kind": kind}
    if member:
        extra["member"] = member
    return InvalidRequestError(f"archive: {message}", extra=extra)


def depth_batch_images_collect(*, images: Sequence[File] = (), archive: File | None = None) -> BatchImages:
    """The photos of a batch: the uploaded files as they are, then the image members of a zip, unpacked.

    InvalidRequestError (400) for no photo, too many, or a hostile or unreadable archive (the message says which
    member and why); TooLargeError (413) for more bytes than DEPTHSITE_BATCH_MAX_BYTES, or one photo over
    DEPTHSITE_MAX_UPLOAD_BYTES. The checks of each photo's content are `depth_job_create`'s, later.
    """
    collected = BatchImages()
    collected.files.extend(images)
    collected.sources.extend("images" for _ in images)
    if len(collected) > batch_max_files():
        raise _too_many(len(collected), field_name="images")
    limit = batch_max_bytes()
    sent = collected.size + (int(archive.size or 0) if archive is not None else 0)
    if limit and sent > limit:
        raise _too_many_bytes(sent, field_name="archive" if archive is not None else "images")
    if archive is not None:
        try:
            _archive_unpack(archive, into=collected)
        except BaseException:
            collected.close()
            raise
    if not collected.files:
        collected.close()
        if archive is not None:
            skipped = "; ".join(f"{item['name']} ({item['reason']})" for item in collected.skipped[:5])
            raise InvalidRequestError("archive: it holds no photo" + (f" (skipped: {skipped})" if skipped else ""),
                                  extra={"field": "archive", "kind": "no_images", "skipped": collected.skipped})
        raise InvalidRequestError("images: send at least one photo (images), or a zip of photos (archive)",
                              extra={"field": "images", "kind": "no_images"})
    return collected


def _declared_entries(handle: BinaryIO) -> int:
    """How many members the archive's end record declares, read before zipfile builds its directory in memory."""
    handle.seek(0, 2)
    size = handle.tell()
    tail_size = min(size, 22 + 0xFFFF)
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    at = tail.rfind(_END_OF_CENTRAL_DIRECTORY)
    if at < 0 or len(tail) - at < 22:
        raise _refused("not a zip file (send photos as `images`, or one .zip of photos as `archive`)",
                       kind="not_a_zip")
    total = struct.unpack("<4s4H2LH", tail[at:at + 22])[4]
    handle.seek(0)
    return total


def _too_many_members(listed: str) -> InvalidRequestError:
    return _refused(f"it lists {listed} members; at most {_archive_max_members()} are read", kind="too_many_members")


def _central_directory_count(handle: BinaryIO) -> None:
    """Counts the records of the central directory, found where zipfile finds it, and refuses the archive as soon
    as there are more than the limit: zipfile reads the directory by its size in bytes (not by the count the end
    record declares) and builds an entry for each record, so a body of small records would cost it far more memory
    and time than was sent. At most limit + 1 records are looked at here."""
    limit = _archive_max_members()
    try:
        # zipfile's own reading of the end record (zip64 included), so the directory counted is the one it reads.
        end = zipfile._EndRecData(handle)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise _refused(f"not a readable zip file ({exc})", kind="not_a_zip") from None
    if not end:
        raise _refused("not a readable zip file (no end of central directory)", kind="not_a_zip")
    signature, size, location = end[0], end[5], end[9]
    if size > limit * _CENTRAL_RECORD_MAX:  # not even `limit` records of the largest size fill that much
        raise _refused(f"its directory is {format_size(size)}, more than {limit} members can take; at most {limit} "
                       "are read", kind="too_many_members")
    # As zipfile: bytes before the archive (a self-extracting stub) shift every offset; the directory ends where
    # the end records begin.
    start = location - size - (_ZIP64_END_RECORDS_SIZE if signature == _END_OF_CENTRAL_DIRECTORY_64 else 0)
    if start < 0:
        raise _refused("not a readable zip file (bad offset for central directory)", kind="not_a_zip")
    counted = walked = 0
    while walked < size:
        if size - walked < _CENTRAL_HEADER_SIZE:
            raise _refused("not a readable zip file (truncated central directory)", kind="not_a_zip")
        handle.seek(start + walked)
        header = handle.read(_CENTRAL_HEADER_SIZE)
        if len(header) != _CENTRAL_HEADER_SIZE:
            raise _refused("not a readable zip file (truncated central directory)", kind="not_a_zip")
        if header[:4] != _CENTRAL_HEADER:
            raise _refused("not a readable zip file (bad magic number for central directory)", kind="not_a_zip")
        counted += 1
        if counted > limit:
            raise _too_many_members(f"more than {limit}")
        name_length, extra_length, comment_length = struct.unpack_from("<3H", header, 28)
        walked += _CENTRAL_HEADER_SIZE + name_length + extra_length + comment_length
    handle.seek(0)


def _member_name_problem(name: str) -> str:
    """Why a member's name is unsafe to have in an archive (the name is never used as a path, but such names
    are how archives attack extractors, so the archive is refused); empty when fine."""
    if not name or "\x00" in name or any(not ch.isprintable() for ch in name):
        return "a name with control characters"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute name"
    if "\\" in name:
        return "a name with backslashes"
    if ".." in PurePosixPath(name).parts:
        return "a name that climbs out of the archive (..)"
    return ""


def _skip_reason(name: str) -> str:
    path = PurePosixPath(name)
    if "__MACOSX" in path.parts or path.name.startswith("."):
        return "hidden file or macOS metadata"
    suffix = path.suffix.lower()
    if suffix in NESTED_ARCHIVE_SUFFIXES:
        return "an archive inside the archive: nested archives are not opened"
    if suffix not in IMAGE_SUFFIXES:
        return f"not a photo by its name (accepted: {', '.join(IMAGE_SUFFIXES)})"
    return ""


def _archive_unpack(archive: File, *, into: BatchImages) -> None:
    handle = getattr(archive, "file", archive)
    into.archive_name = _client_name(archive.name or "archive.zip")
    entries = _declared_entries(handle)
    if entries > _archive_max_members():
        raise _too_many_members(str(entries) if entries != 0xFFFF else "more than 65535")
    _central_directory_count(handle)  # the end record's count may lie; the directory zipfile will read cannot
    try:
        bundle = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise _refused(f"not a readable zip file ({exc})", kind="not_a_zip") from None
    with bundle:
        infos = bundle.infolist()
        if len(infos) > _archive_max_members():
            raise _too_many_members(str(len(infos)))
        selected = _members_select(infos, skipped=into.skipped)
        if len(into.files) + len(selected) > batch_max_files():
            raise _too_many(len(into.files) + len(selected), field_name="archive")
        _members_sizes_check(selected, already=into.size)
        total = into.size
        for info in selected:
            unpacked = _member_unpack(bundle, info, room=batch_max_bytes() - total if batch_max_bytes() else None)
            into._temporary.append(unpacked.file)
            into.files.append(unpacked)
            into.sources.append("archive")
            total += unpacked.size


def _members_select(infos: Iterable[zipfile.ZipInfo], *, skipped: list[dict]) -> list[zipfile.ZipInfo]:
    """The photos among the members, in archive order; refuses the archive for an unsafe member."""
    seen: set[str] = set()
    selected = []
    for info in infos:
        name = info.filename
        problem = _member_name_problem(name)
        if problem:
            raise _refused(f"member {name[:200]!r} has {problem}; refused", kind="unsafe_name", member=name[:200])
        if name in seen:
            raise _refused(f"member {name[:200]!r} is listed twice; refused", kind="duplicate_member",
                           member=name[:200])
        seen.add(name)
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise _refused(f"member {name[:200]!r} is encrypted; send an archive without a password",
                           kind="encrypted", member=name[:200])
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _refused(f"member {name[:200]!r} is a symbolic link; refused", kind="symlink", member=name[:200])
        reason = _skip_reason(name)
        if reason:
            skipped.append({"name": name[:255], "reason": reason})
            continue
        # A photo packed another way refuses the whole archive, like an encrypted one: skipping it would drop a
        # photo the sender meant to send without a word. A member skipped by its name is never opened, so its
        # method does not matter.
        if info.compress_type not in _SUPPORTED_COMPRESSION:
            raise _compression_refused(info)
        selected.append(info)
    return selected


def _compression_refused(info: zipfile.ZipInfo) -> InvalidRequestError:
    name = info.filename[:200]
    method = zipfile.compressor_names.get(info.compress_type, "an unknown method")
    return _refused(f"member {name!r} is compressed with {method} (method {info.compress_type}); only stored or "
                    "deflate members are read: re-create the archive with standard (deflate) compression",
                    kind="compression", member=name)


def _members_sizes_check(selected: Sequence[zipfile.ZipInfo], *, already: int) -> None:
    """What the directory declares, before a byte is unpacked: each photo, the ratio, the batch's total."""
    per_file = settings.DEPTHSITE_MAX_UPLOAD_BYTES
    for info in selected:
        if per_file and info.file_size > per_file:
            raise TooLargeError(
                f"archive: member {info.filename[:200]!r} is {format_size(info.file_size)}; the limit per photo is "
                f"{format_size(per_file)} (DEPTHSITE_MAX_UPLOAD_BYTES)",
                extra={"field": "archive", "kind": "too_many_bytes", "member": info.filename[:200],
                       "limit": per_file, "size": info.file_size})
        if info.file_size > RATIO_FREE_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size):
            raise _refused(f"member {info.filename[:200]!r} unpacks {format_size(info.compress_size)} into "
                           f"{format_size(info.file_size)} (over {MAX_COMPRESSION_RATIO} times): a zip bomb; refused",
                           kind="compression_ratio", member=info.filename[:200])
    declared = already + sum(info.file_size for info in selected)
    if batch_max_bytes() and declared > batch_max_bytes():
        raise _too_many_bytes(declared, field_name="archive", what="the batch unpacked")


def _member_unpack(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, *, room: int | None) -> File:
    """One member into a temporary file, counting what really comes out: never more than it declared, than a
    photo may be, or than the batch has room for (the directory can lie; the bytes cannot)."""
    if info.compress_type not in _SUPPORTED_COMPRESSION:  # never a decompressor whose output is not bounded
        raise _compression_refused(info)
    per_file = settings.DEPTHSITE_MAX_UPLOAD_BYTES
    bounds = [info.file_size] + [limit for limit in (per_file, room) if limit]
    bound = min(bounds)
    target = tempfile.NamedTemporaryFile(prefix="depthsite-batch-", dir=settings.FILE_UPLOAD_TEMP_DIR)
    written = 0
    try:
        with bundle.open(info) as member:
            while chunk := member.read(_CHUNK):
                written += len(chunk)
                if written > bound:
                    raise _refused(f"member {info.filename[:200]!r} unpacks to more than it declares or the limits "
                                   "allow; refused", kind="size_mismatch", member=info.filename[:200])
                target.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        target.close()
        raise _refused(f"member {info.filename[:200]!r} is damaged ({exc})", kind="damaged",
                       member=info.filename[:200]) from None
    except BaseException:
        target.close()
        raise
    target.flush()
    target.seek(0)
    unpacked = File(target, name=PurePosixPath(info.filename).name)
    unpacked.size = written
    return unpacked


def _client_name(name: str) -> str:
    cleaned = "".join(ch for ch in PurePosixPath(name.replace("\\", "/")).name if ch.isprintable())
    return cleaned[-255:] or "archive.zip"
