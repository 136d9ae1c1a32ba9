"""Fixtures shared by the estimator, runtime and half-precision tests."""
from __future__ import annotations

import os
import shutil

import pytest

from inference import estimator as estimator_module
from inference import runtime as runtime_module
from inference.estimator import EstimatorPool


@pytest.fixture
def pool():
    """A pool of the test's own (two networks), cleared afterwards: the process-wide one stays untouched."""
    pool = EstimatorPool(capacity=2)
    yield pool
    pool.clear()


@pytest.fixture
def fresh_runtime_state(settings):
    """ONNX Runtime asked for, and no warning said or artifact failure remembered from an earlier test."""
    settings.DEPTHSITE_RUNTIME = "onnx"
    runtime_module._said.clear()
    estimator_module._failed_artifacts.clear()
    estimator_module._kept_older_recipe.clear()
    yield
    runtime_module._said.clear()
    estimator_module._failed_artifacts.clear()
    estimator_module._kept_older_recipe.clear()


# By (model, weights key, artifact file name): a copy of the artifact a real build made in this process, and its
# row's values.
_built_artifacts: dict[tuple[str, str, str], dict] = {}
_ARTIFACT_FIELDS_NOT_COPIED = ("id", "model", "node", "path", "verified_at", "created_at", "last_used_at")


@pytest.fixture
def artifact_builds_once(monkeypatch, tmp_path_factory):
    """The ONNX artifact of given weights is built for real once per test process; a later build of the same
    weights, in a test using this fixture, gets a copy of that file under its own cache's name and a row with the
    same values (MiDaS_small's export and check: about 4.5 s a test on two cores). For tests about what runs on an
    artifact, not about building one: tests/inference/test_runtime.py builds every time."""
    from django.forms.models import model_to_dict
    from django.utils import timezone

    from inference.runtime import artifacts
    from models_registry import cachefs
    from models_registry.models import WeightFile

    real_build = artifacts._build

    def build(*, model, weight_file, tolerance):
        if tolerance != artifacts.TOLERANCE:  # a test asking for another check gets it
            return real_build(model=model, weight_file=weight_file, tolerance=tolerance)
        key = (model.name, artifacts.weights_key(weight_file), artifacts.runtime_artifact_path(model=model).name)
        kept = _built_artifacts.get(key)
        if kept is None:
            artifact = real_build(model=model, weight_file=weight_file, tolerance=tolerance)
            copy = tmp_path_factory.mktemp("built-artifact") / "artifact"
            shutil.copyfile(cachefs.absolute(artifact.path), copy)
            _built_artifacts[key] = {"file": copy, "values": {
                name: value for name, value in model_to_dict(artifact).items()
                if name not in _ARTIFACT_FIELDS_NOT_COPIED}}
            return artifact
        # A packed artifact finds its weights by its own file name (part of the key): the copy takes the name a
        # build gives it, staged and renamed into place as a build does (a session may still map the old file).
        dest = artifacts.runtime_artifact_path(model=model)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(f"{dest.name}.copy")
        shutil.copyfile(kept["file"], staged)
        os.replace(staged, dest)
        now = timezone.now()
        artifact, _ = WeightFile.objects.update_or_create(
            model=model, format=artifacts.ARTIFACT_FORMAT, node=cachefs.node_name(),
            defaults={**kept["values"], "path": cachefs.relative(dest), "verified_at": now, "created_at": now,
                      "last_used_at": None,
                      "origin_source": f"{weight_file.format} copy, sha256 {weight_file.sha256}"})
        return artifact

    monkeypatch.setattr(artifacts, "_build", build)
