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

    # OpenMP also takes a list per nesting level, or blanks: the network threads take the outer count, or the share.
    for caller, expected in (("4,2", "4"), (" ", "1"), ("max", "1")):
        monkeypatch.setenv("OMP_NUM_THREADS", caller)
        monkeypatch.setenv(conftest._SHARED_BY_CONFTEST, "DEPTHSITE_TORCH_THREADS")
        conftest._share_threads()
        assert conftest.os.environ["DEPTHSITE_TORCH_THREADS"] == expected, caller


def test_sites_started_by_tests_get_the_workers_share(monkeypatch, tmp_path):
    from depthsite.testing.cli import Site

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DEPTHSITE_TORCH_THREADS", "1")
    monkeypatch.setenv("DEPTHSITE_FP16", "1")  # the caller's other settings stay out
    env = Site(root=tmp_path, extra_env={}).env()
    assert (env["OMP_NUM_THREADS"], env["DEPTHSITE_TORCH_THREADS"]) == ("1", "1") and "DEPTHSITE_FP16" not in env
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("DEPTHSITE_TORCH_THREADS")
    env = Site(root=tmp_path, extra_env={"DEPTHSITE_TORCH_THREADS": "2"}).env()
    assert (env["OMP_NUM_THREADS"], env["DEPTHSITE_TORCH_THREADS"]) == ("2", "2")
