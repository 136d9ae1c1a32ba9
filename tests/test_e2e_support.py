"""The helpers that start real sites for the end-to-end tests and benches: no process outlives a failure."""
from __future__ import annotations

import pytest

from depthsite.testing import e2e


def test_stop_site_stops_every_process_when_one_will_not_stop(monkeypatch):
    stopped = []

    def stop(process):
        stopped.append(process)
        if process == "qcluster":
            raise TimeoutError("qcluster did not exit after SIGKILL")

    monkeypatch.setattr(e2e, "_stop", stop)
    running = e2e.RunningSite(site=None, base_url="", token="", database_url="",
                              processes={"qcluster": "qcluster", "web": "web"})
    with pytest.raises(TimeoutError):
        e2e.stop_site(running)
    assert stopped == ["qcluster", "web"]
