"""DEPTHSITE_PRELOAD: a worker warms the named models before its first job; a bad name is skipped, not fatal."""
from __future__ import annotations

import logging

import pytest

from depthsite import env

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_worker_threads(monkeypatch):
    """post_spawn as a real worker (sync off) also starts the heartbeat thread and the exit hooks: this test
    process is no worker, and a thread left beating would outlive the test database."""
    from inference.services import workers

    monkeypatch.setattr(workers, "worker_heartbeat_start", lambda: False)
    monkeypatch.setattr(workers, "worker_exit_hooks_install", lambda: None)


@pytest.fixture
def fresh_pool(monkeypatch):
    from inference import estimator

    pool = estimator.EstimatorPool(capacity=2)
    monkeypatch.setattr(estimator, "_pool", pool)
    yield pool
    pool.clear()


def test_the_setting_reads_a_comma_list(monkeypatch):
    monkeypatch.setenv("DEPTHSITE_PRELOAD", "DPT_Large, MiDaS_small")
    assert env.get_list("DEPTHSITE_PRELOAD", []) == ["DPT_Large", "MiDaS_small"]


@pytest.mark.slow
def test_post_spawn_warms_the_named_models(cached_small, fresh_pool, settings, monkeypatch):
    from django_q.signals import post_spawn

    from inference import estimator

    # As a real worker (sync off), but this test process is no worker: nothing to remove when it exits.
    monkeypatch.setattr(estimator, "warm_models_forget_at_exit", lambda **kwargs: None)
    settings.DEPTHSITE_PRELOAD = ["MiDaS_small"]
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "sync": False}
    assert fresh_pool.warm() == []
    post_spawn.send(sender="django_q", proc_name="Process-1:1")
    warm = fresh_pool.warm()
    assert [w["model"] for w in warm] == ["MiDaS_small"]
    assert warm[0]["weights_sha256"] == cached_small.sha256


def test_a_model_that_cannot_warm_is_skipped_with_its_reason(db, fresh_pool, settings, caplog):
    from inference.services.preload import models_preload

    settings.DEPTHSITE_OFFLINE = True  # nothing cached, nothing may be downloaded
    with caplog.at_level(logging.WARNING):
        outcome = models_preload(names=["No_Such_Model", "MiDaS_small"])
    assert set(outcome) == {"No_Such_Model", "MiDaS_small"}
    assert all(reason != "warm" for reason in outcome.values())
    assert "No_Such_Model" in caplog.text and "MiDaS_small" in caplog.text
    assert fresh_pool.warm() == []


def test_no_preload_without_the_setting_or_in_sync_mode(db, fresh_pool, settings, monkeypatch):
    from django_q.signals import post_spawn

    from inference.services import preload

    called = []
    monkeypatch.setattr(preload, "models_preload", lambda **kw: called.append(kw))
    settings.DEPTHSITE_PRELOAD = []
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "sync": False}
    post_spawn.send(sender="django_q", proc_name="Process-1:1")
    settings.DEPTHSITE_PRELOAD = ["MiDaS_small"]
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "sync": True}
    post_spawn.send(sender="django_q", proc_name="Process-1:1")
    assert called == []
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "sync": False}
    post_spawn.send(sender="django_q", proc_name="Process-1:1")
    assert called == [{}]
