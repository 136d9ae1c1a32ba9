"""Shared settings and fixtures for the network fidelity tests (no database needed)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "reference"

# The goldens were produced with 2 threads; other counts only change round-off (far below the tolerance).
# tests/conftest.py shares the cores out between pytest-xdist workers through OMP_NUM_THREADS.
torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR
