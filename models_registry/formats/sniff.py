"""Recognise a weight file by its content, and name the classic bad files with their fix."""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from depthsite.exceptions import WeightFileError

HEAD_BYTES = 1024
ZIP_MAGIC = b"PK\x03\x04"
ZIP_EOCD = b"PK\x05\x06"
ZIP64_EOCD = b"PK\x06\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
ZIP_EOCD_SIZE, ZIP64_EOCD_SIZE, ZIP64_LOCATOR_SIZE = 22, 56, 20
ZIP_COMMENT_SEARCH = 1 << 16  # how far before its last 22 bytes zipfile looks for the end record (a comment)
# The largest catalogue checkpoint (DPT_BEiT_L_512) holds under 1,500 tensors, one zip entry each besides a
# handful of torch's own records; 16,384 leaves ten times that room. zipfile keeps an object per entry, so this
# bound also bounds what opening an archive costs.
ZIP_MAX_ENTRIES = 16_384
# A directory entry is 46 bytes, its name ("<stem>/data/<n>") and a ZIP64 extra field: under 256 on average.
ZIP_MAX_DIRECTORY = ZIP_MAX_ENTRIES * 256
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# torch's legacy (pre-1.6) serialisation: pickle protocol 2, then LONG1 of its 10-byte magic number.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")

BUNDLE = "bundle"


def _bad(kind: str, message: str, *, file: str = "", **extra) -> WeightFileError:
    return WeightFileError(message, extra={"kind": kind, **extra}, file=file)


def _zip_end_records(path: Path, size: int) -> tuple[int, int] | None:
    """(entries, directory bytes) as zipfile will take them from the archive's end records, or None when it
    has none; read from the last ~64 KiB, never from the directory itself.

    The records are found as zipfile finds them: the end-of-central-directory record in the last 22 bytes,
    or else its last occurrence within the last 22 + 65536 bytes (a comment may follow it), and a ZIP64
    end record only where its locator sits just before that record and the record just before the locator.
    """
    window = min(size, ZIP_EOCD_SIZE + ZIP_COMMENT_SEARCH)
    start = size - min(size, window + ZIP64_LOCATOR_SIZE + ZIP64_EOCD_SIZE)
    with open(path, "rb") as handle:
        handle.seek(start)
        tail = handle.read()
    searched = len(tail) - window
    if tail[-ZIP_EOCD_SIZE:-ZIP_EOCD_SIZE + 4] == ZIP_EOCD and tail[-2:] == b"\0\0":
        at = len(tail) - ZIP_EOCD_SIZE
    else:
        at = tail.rfind(ZIP_EOCD, searched)
        if at < 0 or at + ZIP_EOCD_SIZE > len(tail):
            return None
    _, _, _, _, entries, directory, _, _ = struct.unpack("<4s4H2LH", tail[at:at + ZIP_EOCD_SIZE])
    locator = at - ZIP64_LOCATOR_SIZE
    record = locator - ZIP64_EOCD_SIZE
    if record >= 0 and tail[locator:locator + 4] == ZIP64_LOCATOR and tail[record:record + 4] == ZIP64_EOCD:
        _, _, _, _, _, _, _, entries, directory, _ = struct.unpack("<4sQ2H2L4Q", tail[record:locator])
    return entries, directory


def zip_directory_check(path: Path, size: int) -> None:
    """Refuse a zip without end records (truncated), or whose central directory is larger than a torch
    checkpoint's, before zipfile reads it: zipfile reads the whole directory and keeps a ZipInfo of about
    half a KB per entry, so a directory of millions of empty records costs gigabytes."""
    found = _zip_end_records(path, size)
    if found is None:
        raise _bad(
            "truncated_zip",
            f"{path.name} is a truncated zip archive ({size} bytes; torch says \"failed finding central "
            "directory\"): the download was interrupted; delete it (models optimize) and download again",
            file=path.name,
        )
    entries, directory = found
    if entries > ZIP_MAX_ENTRIES or directory > ZIP_MAX_DIRECTORY:
        raise _bad(
            "zip_directory_too_large",
            f"{path.name} is a zip archive of {entries} entries in a {directory}-byte directory; a torch "
            f"checkpoint has one entry per tensor (at most {ZIP_MAX_ENTRIES} entries, {ZIP_MAX_DIRECTORY} bytes "
            "of directory); refused before reading it", entries=entries, directory_bytes=directory,
            file=path.name,
        )


def sniff_format(path: Path | str) -> str:
    """'pt', 'safetensors', 'h5', 'pkl' or 'bundle', decided by the bytes alone.

    Raises WeightFileError with `extra["kind"]` in: missing, empty, lfs_pointer, html, truncated_zip,
    zip_directory_too_large, not_torch_zip, truncated_safetensors, unknown.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _bad("missing", f"{path}: no such file") from None
    if not path.is_file():
        raise _bad("unknown", f"{path} is not a regular file")
    if size == 0:
        raise _bad(
            "empty",
            f"{path.name} is an empty file (0 bytes): a download or copy never wrote anything; "
            "delete it (models optimize) and download or import the model again", file=path.name,
        )
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)

    if head.startswith(LFS_POINTER):
        oid = ""
        for line in head.decode("utf-8", "replace").splitlines():
            if line.startswith("oid "):
                oid = line[4:].strip()
        raise _bad(
            "lfs_pointer",
            f"{path.name} is a Git LFS pointer ({size} bytes of text{', ' + oid if oid else ''}), not weights: "
            "the repository was cloned without `git lfs pull`; fetch the real file or download the model",
            oid=oid, file=path.name,
        )
    if head.lstrip()[:64].lower().startswith(HTML_STARTS):
        raise _bad(
            "html",
            f"{path.name} is an HTML page ({size} bytes), not weights: a server answered with an error "
            "or login page that was saved as the checkpoint; delete it and download again", file=path.name,
        )
    if head.startswith(ZIP_MAGIC):
        zip_directory_check(path, size)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            raise _bad("truncated_zip", f"{path.name} is a damaged zip archive: {exc}", file=path.name) from None
        if any(name.endswith("data.pkl") for name in names):
            return "pt"
        raise _bad("not_torch_zip", f"{path.name} is a zip archive but not a PyTorch checkpoint (no data.pkl)",
                   file=path.name)
    if head.startswith(HDF5_MAGIC):
        return "h5"
    if head.startswith(LEGACY_TORCH_MAGIC):
        return "pt"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return BUNDLE
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pkl"
    if size >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > size - 8:
            raise _bad(
                "truncated_safetensors",
                f"{path.name} is a truncated safetensors file: its header alone claims {header_len} bytes "
                f"but the file has {size}; delete it and convert or download again", file=path.name,
            )
        return "safetensors"
    preview = head[:16].hex(" ")
    raise _bad(
        "unknown",
        f"{path.name} is not a weight file depthsite knows (pt, safetensors, h5, pkl or a bundle); "
        f"first bytes: {preview}", file=path.name,
    )


def extension_format(path: Path | str) -> str | None:
    """The format a file name claims, or None for an unknown extension."""
    suffix = os.path.splitext(str(path))[1].lower()
    return {
        ".pt": "pt",
        ".pth": "pt",
        ".bin": "pt",
        ".safetensors": "safetensors",
        ".h5": "h5",
        ".hdf5": "h5",
        ".pkl": "pkl",
        ".pickle": "pkl",
        ".tar": BUNDLE,
    }.get(suffix)
