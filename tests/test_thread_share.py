"""The test suite's own thread sharing (tests/conftest.py): each xdist worker gets its share of the cores."""
from __future__ import annotations

from tests import conftest


def test_a_worker_works_out_its_share_again_and_a_callers_setting_stands(monkeypatch):
    # What an xdist worker inherits from pytest's controller, which imported conftest without knowing the workers.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("DEPTHSITE_TORCH_THREADS", "2")
    monkeypatch.setenv(conftest._SHARED_BY_CONFTEST, "DEPTHSITE_TORCH_THREADS,OMP_NUM_THREADS")
    monkeypatch.setattr(conftest, "_threads_per_process", lambda: 1)
    assert conftest._share_threads() == {"OMP_NUM_THREADS", "DEPTHSITE_TORCH_THREADS"}
    assert (conftest.os.environ["OMP_NUM_THREADS"], conftest.os.environ["DEPTHSITE_TORCH_THREADS"]) == ("1", "1")

    # The caller's own OMP_NUM_THREADS (not listed as conftest's): it stands, and the network threads follow it.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv(conftest._SHARED_BY_CONFTEST, "DEPTHSITE_TORCH_THREADS")
    assert conftest._share_threads() == {"DEPTHSITE_TORCH_THREADS"}
    assert (conftest.os.environ["OMP_NUM_THREADS"], conftest.os.environ["DEPTHSITE_TORCH_THREADS"]) == ("3", "3")
