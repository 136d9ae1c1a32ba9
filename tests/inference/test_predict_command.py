"""`manage.py predict`: the five outputs, recoverable 16-bit values, bad images reported without stopping."""
from __future__ import annotations

import io

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from inference.estimator import estimator_pool
from inference.writers import read_pfm, read_png16
from models_registry.detweights import synthetic_image

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_pool():
    yield
    estimator_pool().clear()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(synthetic_image(240, 320)).save(path, quality=95)
    return path


def test_all_formats_and_recoverable_png16(cached_small, photo, tmp_path):
    out = tmp_path / "out"
    stdout = io.StringIO()
    call_command("predict", str(photo), "--model", "MiDaS_small", "--output", str(out), "--format", "all",
                 stdout=stdout)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["photo.16bit.png", "photo.npy", "photo.pfm", "photo.ply", "photo.png", "photo.side.png"]
    depth = np.load(out / "photo.npy")
    assert depth.shape == (240, 320) and depth.dtype == np.float32
    np.testing.assert_array_equal(read_pfm(out / "photo.pfm"), depth)
    step = float(depth.max() - depth.min()) / 65535
    assert np.abs(read_png16(out / "photo.16bit.png") - depth).max() <= step / 2 + 1e-5
    assert "photo.jpg: 320x240" in stdout.getvalue()


def test_a_bad_image_is_reported_and_the_others_processed(cached_small, photo, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    out = tmp_path / "out"
    stderr = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("predict", str(bad), str(photo), "--output", str(out), "--format", "npy", stderr=stderr)
    assert caught.value.returncode == 1
    assert "1 of 2 image(s) failed" in str(caught.value)
    assert f"error: {bad}: not an image" in stderr.getvalue()
    assert (out / "photo.npy").exists() and not (out / "notes.npy").exists()


def test_unknown_format_is_refused_before_loading(cached_small, photo, tmp_path):
    with pytest.raises(CommandError) as caught:
        call_command("predict", str(photo), "--output", str(tmp_path), "--format", "exr")
    assert "unknown output format 'exr'" in str(caught.value)


@pytest.mark.parametrize("copies", [1, 4])
def test_predict_opens_its_onnx_session_without_repacking_for_a_few_images(cached_small, photo, tmp_path, settings,
                                                                           monkeypatch, copies):
    # Repacking the weights costs DPT_Large about 2.5 s at open and saves a few per cent per forward: a process
    # that runs fewer than PREPACK_FROM_RUNS images skips it; a worker (the pool's default) never does.
    from inference import estimator as estimator_module

    settings.DEPTHSITE_RUNTIME = "onnx"
    asked = []
    monkeypatch.setattr(estimator_module, "onnx_estimator_build",
                        lambda **kwargs: asked.append(kwargs["prepack"]))  # None: eager runs the images
    monkeypatch.setattr(estimator_module, "_pool", estimator_module.EstimatorPool())
    assert estimator_module.estimator_pool().prepack is True
    call_command("predict", *[str(photo)] * copies, "--model", "MiDaS_small", "--output", str(tmp_path / "out"),
                 "--format", "npy", stdout=io.StringIO())
    assert asked == [copies >= estimator_module.PREPACK_FROM_RUNS]
