"""CUDA paths: run on a machine with a GPU, skip with the reason elsewhere; bench/gpu.sh skips cleanly on CPU."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from depthsite.testing.cli import PROJECT_ROOT


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif("not _cuda_available()", reason="no CUDA device on this machine")


@needs_cuda
@pytest.mark.slow
def test_cuda_estimator_runs_in_half_precision(cached_small, settings):
    from inference.estimator import EstimatorPool
    from tests.support.estimators import pool_warm
    from models_registry.detweights import synthetic_image

    settings.DEPTHSITE_DEVICE = "cuda"
    settings.DEPTHSITE_FP16 = True
    estimator = pool_warm(EstimatorPool(capacity=1), "MiDaS_small")
    result = estimator.predict(synthetic_image(96, 128))
    assert result.device.startswith("cuda") and result.dtype == "float16"
    assert result.depth.shape == (96, 128) and result.depth_max > result.depth_min


@needs_cuda
@pytest.mark.slow
def test_cuda_fp16_stays_close_to_fp32(cached_small, settings):
    from inference.estimator import EstimatorPool
    from tests.support.estimators import pool_warm
    from models_registry.detweights import synthetic_image

    image = synthetic_image(256, 256)
    settings.DEPTHSITE_DEVICE = "cuda"
    full = pool_warm(EstimatorPool(capacity=2), "MiDaS_small", half=False).predict(image).depth
    half = pool_warm(EstimatorPool(capacity=2), "MiDaS_small", half=True).predict(image).depth
    assert abs(half - full).max() / (full.max() - full.min()) < 2e-2


def test_gpu_bench_skips_cleanly_without_a_gpu():
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is present: the benchmark would run instead of skipping")
    result = subprocess.run([str(PROJECT_ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "no CUDA GPU" in lines[0]
