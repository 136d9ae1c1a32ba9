"""The point-cloud output: a binary little-endian PLY, one coloured point per pixel, a stated pinhole camera and a
relative depth; its browser preview is smaller, the file never is; `predict --format ply` writes it."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from depthsite.exceptions import InvalidRequestError
from inference.writers import (
    PLY_DEPTH_FLOOR, PLY_PREVIEW, DepthMeta, fov_check, ply_preview_stride, read_ply, write_outputs,
    write_ply,
)
from models_registry.detweights import synthetic_image


def scene(height: int = 48, width: int = 64):
    rng = np.random.default_rng(7)
    depth = (rng.random((height, width)) * 5 + 2).astype(np.float32)  # inverse depth, larger is nearer
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return depth, image


def header_value(header: list[str], prefix: str) -> str:
    return next(line for line in header if line.startswith(prefix))


def test_the_ply_has_one_coloured_point_per_pixel_and_states_its_camera(tmp_path):
    depth, image = scene()
    path = write_ply(depth, image, tmp_path / "cloud.ply", fov_degrees=75,
                     meta=DepthMeta(model="MiDaS_small", semantics="relative inverse depth"))
    header, vertices = read_ply(path)
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    assert header_value(header, "element vertex") == f"element vertex {48 * 64}"
    assert [line for line in header if line.startswith("property")] == [
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue"]
    comments = "\n".join(line for line in header if line.startswith("comment"))
    assert "RELATIVE depth" in comments and "not metres" in comments
    assert "pinhole, horizontal fov 75 degrees" in comments and "MiDaS_small" in comments
    assert f"z = 1 / (n + {PLY_DEPTH_FLOOR:g})" in comments
    # Bytes: exactly the header and 15 bytes per pixel, nothing after.
    assert path.stat().st_size == len(("\n".join(header) + "\n").encode()) + 48 * 64 * 15

    colours = np.stack([vertices["red"], vertices["green"], vertices["blue"]], axis=1).reshape(48, 64, 3)
    np.testing.assert_array_equal(colours, image)  # row-major from the top-left, the photo's own colours


def test_z_falls_as_the_inverse_depth_rises_and_the_camera_is_a_pinhole(tmp_path):
    depth, image = scene()
    _, vertices = read_ply(write_ply(depth, image, tmp_path / "cloud.ply", fov_degrees=60))
    z = vertices["z"].reshape(depth.shape).astype(np.float64)
    order = np.argsort(depth.ravel(), kind="stable")
    assert np.all(np.diff(z.ravel()[order]) <= 1e-6)  # nearer (larger value) -> smaller z
    assert z.min() == pytest.approx(1 / (1 + PLY_DEPTH_FLOOR), rel=1e-5)
    assert z.max() == pytest.approx(1 / PLY_DEPTH_FLOOR, rel=1e-5)
    # x / z spans the stated field of view: tan(fov / 2) at the image's edge columns.
    x_over_z = vertices["x"].reshape(depth.shape) / z
    focal = 32 / math.tan(math.radians(30))
    assert x_over_z[:, -1] == pytest.approx(np.full(48, 31.5 / focal), rel=1e-4)
    assert x_over_z[:, 0] == pytest.approx(np.full(48, -31.5 / focal), rel=1e-4)
    # y grows downwards (OpenCV axes), as the header says.
    assert (vertices["y"].reshape(depth.shape)[-1] > 0).all() and (vertices["y"].reshape(depth.shape)[0] < 0).all()


def test_a_flat_or_broken_depth_map_still_makes_finite_points(tmp_path):
    depth = np.full((8, 8), 3.0, np.float32)
    depth[2, 2] = np.nan
    _, vertices = read_ply(write_ply(depth, np.zeros((8, 8, 3), np.uint8), tmp_path / "flat.ply"))
    assert np.isfinite(vertices["z"]).all() and np.isfinite(vertices["x"]).all()


@pytest.mark.parametrize("fov", [0, 5, 179, 180, -60, float("nan"), float("inf"), "wide", None])
def test_a_field_of_view_outside_the_range_is_refused(fov):
    with pytest.raises(InvalidRequestError) as refused:
        fov_check(fov)
    assert refused.value.extra == {"field": "fov"}


def test_the_preview_is_downsampled_and_the_file_is_not(tmp_path):
    depth, image = scene(300, 400)
    written = write_outputs(depth=depth, image_rgb=image, folder=tmp_path, stem="d", formats=["ply"], previews=True)
    assert set(written) == {"ply", PLY_PREVIEW}
    assert read_ply(written["ply"])[1].size == 300 * 400
    stride = ply_preview_stride(width=400, height=300, points=120_000)
    assert stride == 1  # a small photo keeps every point in the preview too
    big_stride = ply_preview_stride(width=4000, height=3000)
    assert big_stride == 10 and math.ceil(3000 / 10) * math.ceil(4000 / 10) <= 120_000
    header, preview = read_ply(write_ply(depth, image, tmp_path / "p.ply", stride=3))
    assert preview.size == 100 * math.ceil(400 / 3) and "one row and column in 3 (preview)" in "\n".join(header)
    # A preview point is the full cloud's point at that pixel.
    _, full = read_ply(written["ply"])
    np.testing.assert_array_equal(preview.reshape(100, -1)[5, 7], full.reshape(300, 400)[15, 21])
    # Without previews (the command line) only the .ply is written.
    assert set(write_outputs(depth=depth, image_rgb=image, folder=tmp_path / "cli", stem="d", formats=["ply"])) \
        == {"ply"}


def test_a_header_value_cannot_end_the_header_early(tmp_path):
    depth, image = scene(4, 4)
    path = write_ply(depth, image, tmp_path / "x.ply", meta=DepthMeta(model="evil\nend_header\nelement vertex 1"))
    header, vertices = read_ply(path)
    assert header.count("end_header") == 1 and vertices.size == 16


@pytest.mark.django_db
def test_predict_writes_the_point_cloud(cached_small, tmp_path):
    photo = tmp_path / "room.jpg"
    Image.fromarray(synthetic_image(120, 160)).save(photo, quality=95)
    out = tmp_path / "out"
    call_command("predict", str(photo), "--output", str(out), "--format", "ply,npy", "--fov", "90",
                 stdout=io.StringIO())
    header, vertices = read_ply(out / "room.ply")
    assert vertices.size == 120 * 160 and "horizontal fov 90 degrees" in "\n".join(header)
    depth = np.load(out / "room.npy")
    z = vertices["z"].reshape(depth.shape)
    nearest, farthest = np.unravel_index(depth.argmax(), depth.shape), np.unravel_index(depth.argmin(), depth.shape)
    assert z[nearest] < z[farthest]
    with Image.open(photo) as reread:
        colours = np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1).reshape(120, 160, 3)
        np.testing.assert_array_equal(colours, np.asarray(reread.convert("RGB")))
    assert not (out / "room.preview.ply").exists()

    with pytest.raises(CommandError) as refused:
        call_command("predict", str(photo), "--output", str(out), "--format", "ply", "--fov", "200")
    assert "field of view" in str(refused.value)
