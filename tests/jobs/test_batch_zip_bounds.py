"""A hostile zip never makes the server allocate or iterate far more than the bytes it sent: only stored and deflate
members are unpacked (zipfile bounds the output of each read for those alone), and the central directory is counted
against the member limit before zipfile builds an entry for each of its records."""
from __future__ import annotations

import bz2
import io
import re
import struct
import tracemalloc
import zipfile
import zlib

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from depthsite.exceptions import InvalidRequestError
from depthsite.testing import images
from inference.services.batch_images import depth_batch_images_collect
from tests.jobs.test_batch import assert_nothing_created, make_zip, post_batch

_LOCAL = struct.Struct("<4s5H3L2H")  # 30 bytes, then the name
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # 46 bytes, then name, extra and comment
_END = struct.Struct("<4s4H2LH")  # 22 bytes


def raw_zip(members: list[tuple[str, int, bytes, int, int]], *, declared: int | None = None) -> bytes:
    """A zip built byte by byte from (name, method, packed bytes, crc, size it declares unpacked) members, so that
    the method and the declared size may be anything; `declared` overrides the count in the end record."""
    body, central = bytearray(), bytearray()
    for name, method, packed, crc, size in members:
        encoded = name.encode()
        offset = len(body)
        body += _LOCAL.pack(b"PK\x03\x04", 46, 0, method, 0, 0x21, crc, len(packed), size, len(encoded), 0)
        body += encoded + packed
        central += _CENTRAL.pack(b"PK\x01\x02", 0x031E, 46, 0, method, 0, 0x21, crc, len(packed), size,
                                 len(encoded), 0, 0, 0, 0, 0o100644 << 16, offset) + encoded
    count = len(members) if declared is None else declared
    return bytes(body + central + _END.pack(b"PK\x05\x06", 0, 0, count, count, len(central), len(body), 0))


def bzip2_bomb(unpacked: int) -> bytes:
    """One bzip2 "photo" that declares 100 bytes unpacked (no ratio check applies) and hides `unpacked` zeros."""
    zeros = b"\x00" * unpacked
    return raw_zip([("photo.jpg", zipfile.ZIP_BZIP2, bz2.compress(zeros), zlib.crc32(zeros), 100)])


def lying_directory(entries: int, *, declared: int = 1) -> bytes:
    """An end record that declares `declared` members over a central directory of `entries` empty records."""
    record = _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"x"
    directory = record * entries
    return directory + _END.pack(b"PK\x05\x06", 0, 0, declared, declared, len(directory), 0, 0)


def with_declared_count(archive: bytes, count: int) -> bytes:
    data = bytearray(archive)
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<2H", data, end + 8, count, count)
    return bytes(data)


def as_upload(data: bytes, name: str = "photos.zip") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="application/zip")


def collect(data: bytes):
    return depth_batch_images_collect(archive=as_upload(data))


@pytest.fixture
def decompressors(monkeypatch) -> list[int]:
    """The compression methods zipfile made a decompressor for, in order."""
    made: list[int] = []
    real = zipfile._get_decompressor

    def recording(compress_type):
        made.append(compress_type)
        return real(compress_type)

    monkeypatch.setattr(zipfile, "_get_decompressor", recording)
    return made


@pytest.fixture
def directory_reads(monkeypatch) -> list[int]:
    """ZipInfo objects zipfile built while it read a central directory (one per record)."""
    built: list[int] = []
    real_init = zipfile.ZipInfo.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipInfo, "__init__", counting)
    return built


# --- compression methods -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_bzip2_bomb_is_refused_before_anything_is_decompressed(api, small_model, run_jobs, decompressors):
    archive = bzip2_bomb(100_000_000)  # 100 MB of zeros in a zip of a few hundred bytes
    assert len(archive) < 1000
    tracemalloc.start()
    try:
        response = post_batch(api, run_jobs, archive=archive)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 400, response.content
    assert peak < 50 * 1000**2, f"a {len(archive)} byte zip made the request allocate {peak / 1e6:.0f} MB"
    body = response.json()
    assert body["extra"]["kind"] == "compression" and body["extra"]["member"] == "photo.jpg"
    assert "'photo.jpg'" in body["message"] and "bzip2" in body["message"]
    assert "re-create the archive with standard (deflate) compression" in body["message"]
    assert zipfile.ZIP_BZIP2 not in decompressors
    assert_nothing_created()


@pytest.mark.django_db
def test_an_lzma_photo_is_refused_with_a_clear_message(api, small_model, run_jobs, decompressors):
    archive = make_zip({"a.jpg": images.jpeg(), "b.jpg": images.jpeg(80, 60)}, compression=zipfile.ZIP_LZMA)
    response = post_batch(api, run_jobs, archive=archive)
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["extra"]["kind"] == "compression" and body["extra"]["member"] == "a.jpg"
    assert "'a.jpg'" in body["message"] and "lzma" in body["message"]
    assert "re-create the archive with standard (deflate) compression" in body["message"]
    assert decompressors == []
    assert_nothing_created()


@pytest.mark.django_db
def test_the_web_form_shows_the_compression_refusal_under_the_archive_field(client, user, small_model, run_jobs):
    client.force_login(user)
    form = {"model": "MiDaS_small", "colormap": "inferno", "outputs": ["png"],
            "archive": as_upload(make_zip({"a.jpg": images.jpeg()}, compression=zipfile.ZIP_BZIP2))}
    with run_jobs():
        response = client.post(reverse("inference:batch_upload"), form)
    errors = re.search(r'<ul class="errorlist" id="archive-errors">(.*?)</ul>', response.content.decode(), re.S)
    assert errors and "standard (deflate) compression" in errors.group(1)
    assert_nothing_created()


def test_one_unsupported_photo_refuses_the_whole_archive(settings, decompressors):
    # A deflate photo first: the refusal comes before any member is unpacked, not when the bad one is reached.
    archive = make_zip([("good.jpg", images.jpeg())])
    bad = io.BytesIO(archive)
    with zipfile.ZipFile(bad, "a") as bundle:
        bundle.writestr("bad.jpg", images.jpeg(), compress_type=zipfile.ZIP_BZIP2)
    with pytest.raises(InvalidRequestError) as refused:
        collect(bad.getvalue())
    assert refused.value.extra["kind"] == "compression" and refused.value.extra["member"] == "bad.jpg"
    assert decompressors == []


def test_stored_and_deflated_photos_still_unpack_with_only_bounded_decompressors(settings, decompressors):
    photo, other = images.jpeg(), images.png(64, 48)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("trip/stored.jpg", photo, compress_type=zipfile.ZIP_STORED)
        bundle.writestr("trip/deflated.png", other, compress_type=zipfile.ZIP_DEFLATED)
        # Not a photo: skipped by its name and never opened, whatever its method.
        bundle.writestr("trip/notes.txt", b"hello " * 100, compress_type=zipfile.ZIP_BZIP2)
    with collect(buffer.getvalue()) as batch:
        assert [upload.name for upload in batch.files] == ["stored.jpg", "deflated.png"]
        assert [upload.read() for upload in batch.files] == [photo, other]
        assert [item["name"] for item in batch.skipped] == ["trip/notes.txt"]
    assert decompressors and set(decompressors) <= {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}


# --- the central directory ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_directory_longer_than_its_end_record_declares_is_refused_before_zipfile_reads_it(
        api, small_model, run_jobs, directory_reads, monkeypatch):
    read = []
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: read.append(1))
    archive = lying_directory(20_000)  # declares 1 member; the default limit is 10 * 50 + 100
    response = post_batch(api, run_jobs, archive=archive)
    assert response.status_code == 400, response.content
    assert response.json()["extra"]["kind"] == "too_many_members"
    assert "at most 600 are read" in response.json()["message"]
    assert read == [] and directory_reads == []
    assert_nothing_created()


def test_the_directory_is_counted_up_to_the_limit_exactly(settings, directory_reads):
    settings.DEPTHSITE_BATCH_MAX_FILES = 1  # at most 10 * 1 + 100 members are read
    at_limit = with_declared_count(make_zip({f"junk/{n}.txt": b"" for n in range(110)}), 1)
    with pytest.raises(InvalidRequestError) as refused:
        collect(at_limit)
    assert refused.value.extra["kind"] == "no_images"  # read whole: 110 is allowed
    over = with_declared_count(make_zip({f"junk/{n}.txt": b"" for n in range(111)}), 1)
    directory_reads.clear()  # make_zip built its own
    with pytest.raises(InvalidRequestError) as refused:
        collect(over)
    assert refused.value.extra["kind"] == "too_many_members"
    assert directory_reads == []


def test_a_directory_too_large_for_the_member_limit_is_refused_unread(settings, directory_reads):
    settings.DEPTHSITE_BATCH_MAX_FILES = 1
    # 111 records of the largest size the format allows (46 bytes, and 3 lengths of 65535) cannot fit in less.
    archive = bytearray(lying_directory(1))
    end = archive.rfind(b"PK\x05\x06")
    struct.pack_into("<2L", archive, end + 12, 110 * (46 + 3 * 0xFFFF) + 1, 0)
    with pytest.raises(InvalidRequestError) as refused:
        collect(bytes(archive))
    assert refused.value.extra["kind"] == "too_many_members"
    assert directory_reads == []


@pytest.mark.parametrize("damage", ["starts before the file", "bad record", "truncated record"])
def test_a_damaged_directory_is_not_a_readable_zip(settings, damage):
    archive = bytearray(make_zip({"a.jpg": images.jpeg()}))
    end = archive.rfind(b"PK\x05\x06")
    central = archive.rfind(b"PK\x01\x02")
    if damage == "starts before the file":
        struct.pack_into("<L", archive, end + 12, len(archive) * 2)
    elif damage == "bad record":
        archive[central:central + 4] = b"PK\x01\x09"
    else:  # a directory of 20 bytes cannot hold the 46 of a record
        struct.pack_into("<2L", archive, end + 12, 20, central + (end - central - 20))
    with pytest.raises(InvalidRequestError) as refused:
        collect(bytes(archive))
    assert refused.value.extra["kind"] == "not_a_zip"


def test_a_zip64_end_record_and_leading_bytes_are_read_as_zipfile_reads_them(settings):
    photo = images.jpeg()
    plain = make_zip({"a.jpg": photo})
    end = plain.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack_from("<HLL", plain, end + 10)
    # A zip64 end record and its locator between the directory and the end record, whose size and offset then
    # defer to them (0xFFFFFFFF): the directory starts where zipfile finds it.
    zip64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
    tail = bytearray(plain[end:])
    struct.pack_into("<2L", tail, 12, 0xFFFFFFFF, 0xFFFFFFFF)
    for archive in (plain[:end] + zip64 + locator + bytes(tail), b"#!self-extracting stub\n" * 10 + plain):
        with collect(archive) as batch:
            assert [upload.read() for upload in batch.files] == [photo]
