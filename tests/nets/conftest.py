"""Shared settings and fixtures for the network fidelity tests (no database needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "reference"

# The goldens were produced with 2 threads; more threads only change round-off, but keep CI comparable.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR
