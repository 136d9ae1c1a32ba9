"""A file of many frames costs what its first frame costs: nothing counts or walks the frames after it.

Pillow's `n_frames` on a TIFF reads every IFD in the chain (and its loop check grows with the square of their
number): a 25 MB TIFF of 1x1 IFDs kept a worker busy for minutes before the photo was even decoded."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, TiffImagePlugin

from inference.images import image_check, image_open


def chained_tiff(count: int) -> bytes:
    """A little-endian TIFF of `count` 1x1 8-bit grey frames, each IFD pointing at the next and at one shared
    pixel: about 100 bytes a frame, so a few hundred kB make thousands of frames."""
    header = b"II*\x00" + struct.pack("<I", 9) + b"\x80"  # the first IFD sits right after the one pixel (offset 8)
    tags = ((256, 1), (257, 1), (258, 8), (259, 1), (262, 1), (273, 8), (278, 1), (279, 1))
    ifd_size = 2 + 12 * len(tags) + 4
    out = bytearray(header)
    for index in range(count):
        following = len(out) + ifd_size if index < count - 1 else 0
        out += struct.pack("<H", len(tags))
        for tag, value in tags:
            kind = 4 if tag in (273, 279) else 3  # offsets and byte counts as LONG, the rest as SHORT
            out += struct.pack("<HHII", tag, kind, 1, value)
        out += struct.pack("<I", following)
    return bytes(out)


def multi_frame(fmt: str, values=(10, 120, 200)) -> bytes:
    frames = [Image.fromarray(np.full((24, 32, 3), value, np.uint8)) for value in values]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@pytest.fixture
def frames_never_counted(monkeypatch):
    """Counting the frames of a TIFF or GIF walks the whole file: any call fails the test."""
    def refuse(self):
        raise AssertionError(f"{type(self).__name__}.n_frames walks every frame of the file")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(refuse))
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "n_frames", property(refuse))


@pytest.mark.parametrize("fmt", ["TIFF", "GIF"])
def test_a_multi_frame_file_opens_its_first_frame_without_counting_frames(frames_never_counted, fmt):
    loaded = image_open(multi_frame(fmt))
    assert loaded.format == fmt and loaded.rgb.shape == (24, 32, 3)
    assert abs(int(loaded.rgb.mean()) - 10) <= 2  # the first frame, not the second (120) or the last (200)
    assert loaded.animated


def test_a_single_frame_tiff_is_not_animated(frames_never_counted):
    assert not image_open(multi_frame("TIFF", values=(90,))).animated


def test_a_long_chain_of_ifds_is_read_no_further_than_the_first_frames(monkeypatch):
    data = chained_tiff(5000)
    assert Image.open(io.BytesIO(data)).n_frames == 5000  # the file really is the long chain
    reads = []
    original = TiffImagePlugin.ImageFileDirectory_v2.load
    monkeypatch.setattr(TiffImagePlugin.ImageFileDirectory_v2, "load",
                        lambda self, fp: reads.append(fp.tell()) or original(self, fp))

    info = image_check(data)
    loaded = image_open(data)
    assert (info.width, info.height) == (1, 1) and loaded.rgb.shape == (1, 1, 3)
    assert int(loaded.rgb[0, 0, 0]) == 0x80
    assert len(set(reads)) <= 2, f"{len(set(reads))} IFDs read of a 5000-frame chain"
