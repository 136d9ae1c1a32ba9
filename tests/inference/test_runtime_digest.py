"""An ONNX artifact is recorded under the digest of the tensors it was built from, computed at the build, never
under the digest its weights' row claims: tensors that disagree with their record are refused and marked corrupt."""
from __future__ import annotations

import errno
import os
import shutil

import pytest

from depthsite.exceptions import WeightFileError
from inference.runtime import artifacts
from models_registry import cachefs
from models_registry.choices import Health
from models_registry.formats import content_digest, write_weights
from models_registry.models import WeightFile

pytestmark = pytest.mark.django_db


@pytest.fixture
def quick_build(monkeypatch, settings):
    """The export and its check are tested elsewhere (tests/inference/test_runtime.py): here a file stands in."""
    settings.DEPTHSITE_RUNTIME = "onnx"
    monkeypatch.setattr(artifacts, "network_export", lambda network, config, out: out.write_bytes(b"graph" * 100))
    monkeypatch.setattr(artifacts, "pack_write", lambda src, dst, name: shutil.copyfile(src, dst))
    monkeypatch.setattr(artifacts, "artifact_compare",
                        lambda network, config, path: artifacts.ArtifactCheck(shapes=[], worst=0.0))


def _overwrite_same_size(weight_file, arrays, tmp_path):
    """Other values in the same layout, same size: bit rot, or another fine-tune copied over the file."""
    path = cachefs.absolute(weight_file.path)
    tampered = {key: (value if index else -value) for index, (key, value) in enumerate(arrays.items())}
    other = tmp_path / "other" / path.name
    other.parent.mkdir()
    write_weights(tampered, other, "pt", {})
    assert other.stat().st_size == path.stat().st_size
    os.replace(other, path)


def test_the_artifact_carries_the_digest_of_the_tensors_it_was_built_from(cached_small, small_model, small_arrays,
                                                                          quick_build):
    artifact = artifacts.runtime_artifact_build(model=small_model, weight_file=cached_small)
    assert artifact.content_digest == content_digest(small_arrays) == cached_small.content_digest


def test_tensors_that_changed_under_their_record_build_nothing(cached_small, small_model, small_arrays, tmp_path,
                                                               quick_build):
    _overwrite_same_size(cached_small, small_arrays, tmp_path)
    with pytest.raises(WeightFileError, match="tensors changed"):
        artifacts.runtime_artifact_build(model=small_model, weight_file=cached_small)
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT
    assert not WeightFile.objects.filter(model=small_model, format=artifacts.ARTIFACT_FORMAT).exists()
    assert not artifacts.runtime_artifact_path(model=small_model).exists()


def test_a_row_without_a_content_digest_is_checked_by_its_sha256(cached_small, small_model, small_arrays, tmp_path,
                                                                 quick_build):
    WeightFile.objects.filter(pk=cached_small.pk).update(content_digest="")
    cached_small.refresh_from_db()
    _overwrite_same_size(cached_small, small_arrays, tmp_path)
    with pytest.raises(WeightFileError, match="tensors changed"):
        artifacts.runtime_artifact_build(model=small_model, weight_file=cached_small)


def test_weights_condemned_by_the_build_are_not_run_in_eager_either(cached_small, small_model, small_arrays,
                                                                     tmp_path, quick_build, pool,
                                                                     fresh_runtime_state):
    """The build refused the changed tensors and marked them corrupt; falling back to eager would load those same
    tensors and store their results under the record's sha256 (where result reuse would hand them out)."""
    _overwrite_same_size(cached_small, small_arrays, tmp_path)
    with pytest.raises(WeightFileError, match="tensors changed"):
        pool.get(model=small_model, weight_file=cached_small)
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT


@pytest.mark.parametrize("shortage", [OSError(errno.EMFILE, "Too many open files"), MemoryError()],
                         ids=["EMFILE", "MemoryError"])
def test_an_artifact_that_cannot_be_opened_for_a_shortage_keeps_its_health(cached_small, small_model, monkeypatch,
                                                                         fresh_runtime_state, shortage):
    """Opening the artifact ran short of file descriptors or memory: eager this once, the artifact neither marked
    corrupt (a rebuild of minutes) nor remembered as failed for the rest of the process."""
    from inference import estimator
    from inference.runtime import onnx

    stand_in = cached_small  # plays the artifact's row
    monkeypatch.setattr(artifacts, "runtime_artifact_find", lambda **kwargs: stand_in)

    def short(**kwargs):
        raise shortage

    monkeypatch.setattr(onnx, "OnnxEstimator", short)
    assert estimator.onnx_estimator_build(model=small_model, weight_file=cached_small) is None
    stand_in.refresh_from_db()
    assert stand_in.health == Health.OK and not estimator._failed_artifacts
