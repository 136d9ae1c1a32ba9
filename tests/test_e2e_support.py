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


@pytest.mark.slow  # two `migrate` processes
def test_a_second_site_starts_from_a_copy_of_the_first_sites_migrated_database(tmp_path, monkeypatch):
    import sqlite3
    import uuid

    from depthsite.testing import cli

    ran = []
    manage = cli.Site.manage

    def counted(site, *args, **kwargs):
        ran.append((site.root.name, args[0]))
        return manage(site, *args, **kwargs)

    monkeypatch.setattr(cli.Site, "manage", counted)
    node = f"node-{uuid.uuid4().hex[:8]}"  # an environment no site of this process had yet
    first = cli.make_site(tmp_path / "first", DEPTHSITE_NODE=node)
    second = cli.make_site(tmp_path / "second", DEPTHSITE_NODE=node)
    other = cli.make_site(tmp_path / "other", DEPTHSITE_NODE=node + "-b")
    assert ran == [("first", "migrate"), ("other", "migrate")]

    def rows(site, sql):
        with sqlite3.connect(site.root / "db.sqlite3") as connection:
            return connection.execute(sql).fetchall()

    applied = "SELECT app, name FROM django_migrations ORDER BY app, name"
    models = "SELECT name FROM models_registry_registeredmodel ORDER BY name"
    assert rows(second, applied) == rows(first, applied) == rows(other, applied) and len(rows(first, applied)) > 40
    assert rows(second, models) == rows(first, models) and len(rows(first, models)) >= 15  # the seeded catalogue
    with sqlite3.connect(second.root / "db.sqlite3") as connection:  # each site has a file of its own
        connection.execute("DELETE FROM models_registry_registeredmodel")
    assert rows(second, models) == [] and len(rows(first, models)) >= 15
    assert cli.make_site(tmp_path / "third", DEPTHSITE_NODE=node) and rows(cli.Site(tmp_path / "third", {}), models)
