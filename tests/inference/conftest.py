"""Fixtures shared by the estimator, runtime and half-precision tests."""
from __future__ import annotations

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
    yield
    runtime_module._said.clear()
    estimator_module._failed_artifacts.clear()
