"""A JPEG's decoding work is bounded by what a photo needs, not only its pixels: scans and marker segments are
counted before Pillow sees the file (inference.images._jpeg_work_check)."""
from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from inference import images
from inference.exceptions import ImageError


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment after SOI; a scan's segment runs to the end of its entropy data."""
    out, position = [], 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            out.append((marker, position, position + 2))
            break
        end = position + 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        out.append((marker, position, end))
        position = end
    return out


def progressive(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, "JPEG", progressive=True, quality=90)
    return buffer.getvalue()


def scans_of(data: bytes) -> int:
    return sum(1 for marker, _, _ in _segments(data) if marker == 0xDA)


def with_scans(total: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `total` scans (libjpeg decodes every one)."""
    data = progressive()
    segments = _segments(data)
    marker, start, end = [s for s in segments if s[0] == 0xDA][-1]
    eoi = segments[-1][1]
    extra = total - scans_of(data)
    assert extra >= 0
    return data[:eoi] + data[start:end] * extra + data[eoi:]


def with_comments(count: int) -> bytes:
    data = progressive()
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def test_photos_as_encoders_write_them_pass():
    data = progressive()
    assert 6 <= scans_of(data) <= 12  # libjpeg's own progression
    assert images.image_check(data).format == "JPEG"
    assert images.image_open(with_scans(images.MAX_JPEG_SCANS)).rgb.shape == (48, 64, 3)
    assert images.image_check(with_comments(100)).width == 64


@pytest.mark.parametrize("read", [images.image_check, images.image_open])
def test_more_scans_than_the_limit_is_refused_before_decoding(read, monkeypatch):
    data = with_scans(images.MAX_JPEG_SCANS + 1)
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: pytest.fail("Pillow was handed the file"))
    with pytest.raises(ImageError) as refused:
        read(data)
    assert refused.value.extra["kind"] == "too_many_scans" and "progressive scans" in str(refused.value)


def test_more_segments_than_the_limit_is_refused():
    with pytest.raises(ImageError) as refused:
        images.image_check(with_comments(images.MAX_JPEG_SEGMENTS + 1))
    assert refused.value.extra["kind"] == "too_many_segments"


def test_files_and_streams_are_walked_where_they_stand(tmp_path):
    """A path and an open file are memory-mapped; the stream is left where the walk found it."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(with_scans(images.MAX_JPEG_SCANS + 1))
    with pytest.raises(ImageError, match="progressive scans"):
        images.image_check(bad)
    good = tmp_path / "good.jpg"
    good.write_bytes(b"prefix" + progressive())
    with open(good, "rb") as handle:
        handle.seek(6)
        images._jpeg_work_check(handle)
        assert handle.tell() == 6
    with open(bad, "rb") as handle:
        with pytest.raises(ImageError):
            images._jpeg_work_check(handle)
    stream = io.BytesIO(b"xx" + with_scans(images.MAX_JPEG_SCANS + 1))
    stream.seek(2)
    with pytest.raises(ImageError):
        images._jpeg_work_check(stream)


def test_a_scan_hidden_in_fill_bytes_and_restart_markers_is_still_counted():
    """Fill bytes (0xFF runs) before a marker, and stuffed or restart bytes inside a scan, do not end the walk."""
    data = with_scans(images.MAX_JPEG_SCANS + 1)
    first_scan = data.index(b"\xff\xda")
    padded = data[:first_scan] + b"\xff" * 50 + data[first_scan:]
    with pytest.raises(ImageError):
        images.image_check(padded)


@pytest.mark.django_db
def test_the_api_answers_a_scan_bomb_with_a_400_naming_it(settings, client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    response = client.post("/api/predictions/", {"image": SimpleUploadedFile(
        "scans.jpg", with_scans(images.MAX_JPEG_SCANS + 1), content_type="image/jpeg")})
    assert response.status_code == 400, response.content
    assert response.json()["extra"]["kind"] == "too_many_scans"


def _after_first_segment(data: bytes, junk: bytes) -> bytes:
    _, _, end = _segments(data)[0]  # APP0
    return data[:end] + junk + data[end:]


@pytest.mark.parametrize("junk", [b"\x00", b"junk", b"\xff\x00\xff\xff"], ids=["zero", "text", "stuffed-and-fill"])
def test_junk_between_segments_does_not_hide_the_scans_after_it(junk):
    """Pillow and libjpeg skip bytes that are not a marker (with a warning); the walk finds the next marker as
    libjpeg does, so one junk byte after a segment cannot end it early and pass every scan behind it."""
    data = _after_first_segment(with_scans(images.MAX_JPEG_SCANS + 1), junk)
    with pytest.raises(ImageError) as refused:
        images.image_check(data)
    assert refused.value.extra["kind"] == "too_many_scans"
    # The same junk in a photo with few scans still passes, as the decoders take it.
    assert images.image_check(_after_first_segment(progressive(), junk)).width == 64


def test_a_marker_without_length_inside_a_scan_does_not_end_the_walk():
    data = with_scans(images.MAX_JPEG_SCANS + 1)
    _, _, end = [s for s in _segments(data) if s[0] == 0xDA][0]
    with pytest.raises(ImageError, match="progressive scans"):
        images.image_check(data[:end] + b"\xff\x01\x00" + data[end:])


def test_filler_before_the_first_scan_is_bounded():
    """Pillow steps over fill and junk bytes one at a time in Python (2 MB of fill cost 1.8 s)."""
    with pytest.raises(ImageError) as refused:
        images.image_check(_after_first_segment(progressive(), b"\xff" * (images.MAX_JPEG_HEADER_JUNK + 10)))
    assert refused.value.extra["kind"] == "too_much_filler"
    assert images.image_check(_after_first_segment(progressive(), b"\xff" * 1000)).height == 48


def test_restart_markers_in_the_data_are_not_segments():
    """A photo written with restart intervals has a marker every few blocks: thousands in a large one."""
    buffer = io.BytesIO()
    Image.effect_noise((1024, 768), 40).convert("RGB").save(buffer, "JPEG", restart_marker_blocks=1)
    data = buffer.getvalue()
    assert sum(data.count(bytes([0xFF, code])) for code in range(0xD0, 0xD8)) > images.MAX_JPEG_SEGMENTS
    assert images.image_check(data).width == 1024


@pytest.mark.parametrize("stray", [b"\xff\xd8", b"\xff\xd9"], ids=["start", "end"])
def test_a_stray_start_or_end_of_image_in_the_header_does_not_end_the_count(stray):
    """Pillow's header loop steps over a stray SOI or EOI and reads on: the segments behind it are counted."""
    data = progressive()
    crafted = data[:2] + stray + b"\xff\xfe\x00\x02" * (images.MAX_JPEG_SEGMENTS + 1) + data[2:]
    with pytest.raises(ImageError) as refused:
        images.image_check(crafted)
    assert refused.value.extra["kind"] == "too_many_segments"
