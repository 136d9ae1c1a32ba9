"""Depth outputs: PFM as MiDaS writes it, 16-bit PNG with recoverable values, colour maps, side by side."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.colormaps import COLORMAPS, colormap_table, colorize
from inference.writers import (
    DepthMeta,
    parse_formats,
    read_pfm,
    read_png16,
    write_outputs,
    write_pfm,
)
from depthsite.exceptions import InvalidRequestError


@pytest.fixture
def depth():
    y, x = np.mgrid[0:30, 0:40]
    return (5.0 + x * 0.25 + np.sin(y / 3.0)).astype(np.float32)


def test_pfm_matches_midas_layout(tmp_path, depth):
    path = write_pfm(depth, tmp_path / "d.pfm")
    raw = path.read_bytes()
    assert raw.startswith(b"Pf\n40 30\n-1.000000\n")
    body = np.frombuffer(raw[len(b"Pf\n40 30\n-1.000000\n"):], dtype="<f4").reshape(30, 40)
    np.testing.assert_array_equal(body, np.flipud(depth))  # bottom row first
    np.testing.assert_array_equal(read_pfm(path), depth)


def test_png16_recovers_values_within_quantisation(tmp_path, depth):
    written = write_outputs(depth=depth, image_rgb=np.zeros((30, 40, 3), np.uint8), folder=tmp_path, stem="x",
                            formats=["png16"], meta=DepthMeta(model="MiDaS_small", weights_sha256="ab" * 32))
    with Image.open(written["png16"]) as image:
        assert image.mode.startswith("I;16") or image.mode == "I"
        assert image.text["depthsite:model"] == "MiDaS_small"
        assert float(image.text["depthsite:depth_min"]) == pytest.approx(float(depth.min()))
    recovered = read_png16(written["png16"])
    step = (float(depth.max()) - float(depth.min())) / 65535
    assert np.abs(recovered - depth).max() <= step / 2 + 1e-6


def test_every_output_is_written_atomically_with_its_suffix(tmp_path, depth):
    image = np.full((30, 40, 3), 128, np.uint8)
    written = write_outputs(depth=depth, image_rgb=image, folder=tmp_path, stem="photo", formats=["all"])
    assert sorted(p.name for p in written.values()) == [
        "photo.16bit.png", "photo.npy", "photo.pfm", "photo.ply", "photo.png", "photo.side.png"]
    assert not list(tmp_path.glob(".tmp-*"))
    np.testing.assert_array_equal(np.load(written["npy"]), depth)
    with Image.open(written["side"]) as side:
        assert side.size == (40 + 8 + 40, 30)
    with Image.open(written["png"]) as colour:
        # Indexed: the colour map is the palette; the pixels are colorize()'s exactly.
        assert colour.mode == "P" and colour.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(colour.convert("RGB")), colorize(depth))


@pytest.mark.parametrize("name", COLORMAPS)
def test_colormaps_are_256_entry_tables(name):
    table = colormap_table(name)
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert len({tuple(row) for row in table}) > 200  # a real ramp, not a constant


def test_colorize_maps_min_and_max_to_the_table_ends(depth):
    coloured = colorize(depth, "inferno")
    table = colormap_table("inferno")
    flat = depth.reshape(-1)
    assert tuple(coloured.reshape(-1, 3)[flat.argmin()]) == tuple(table[0])
    assert tuple(coloured.reshape(-1, 3)[flat.argmax()]) == tuple(table[255])


def test_unknown_colormap_and_format_are_validation_errors():
    with pytest.raises(InvalidRequestError):
        colormap_table("jet")
    with pytest.raises(InvalidRequestError):
        parse_formats("png,tiff")
    assert parse_formats("npy,png") == ["png", "npy"]
