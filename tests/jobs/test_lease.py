"""A running job holds a lease that its worker renews; recovery treats an expired lease as a dead worker.

Time is moved by patching `timezone.now`, never by sleeping.
"""
from __future__ import annotations

import types
from pathlib import Path
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from depthsite.choices import RunStatus
from inference.choices import JobErrorCode
from inference.models import DepthJob
from inference.services import job_recovery, job_runs, workers
from inference.services import jobs as job_services
from inference.services.job_recovery import depth_jobs_recover
from inference.services.job_results import results_folder, results_staged
from inference.services.job_runs import depth_job_run
from inference.services.job_state import Superseded, job_attempt_save
from inference.services.workers import depth_job_lease_renew, worker_heartbeat
from inference.worker import worker_id
from models_registry.models import RegisteredModel, WarmModel
from models_registry.selectors import warm_models
from tests.jobs.conftest import upload
from tests.support.estimators import RowStub

pytestmark = pytest.mark.django_db

LEASE = 30


@pytest.fixture(autouse=True)
def enqueued(settings, monkeypatch) -> list[str]:
    """The lease settings; tasks are recorded, not run inline, so each test runs a delivery itself."""
    settings.DEPTHSITE_JOB_LEASE = LEASE
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "max_attempts": 3}
    queued: list[str] = []

    def record(job_id) -> None:
        queued.append(str(job_id))

    # Created jobs and recovered ones: every way a job gets a task.
    monkeypatch.setattr(job_services, "depth_job_enqueue", record)
    monkeypatch.setattr(job_recovery, "depth_job_enqueue", record)
    return queued


class Clock:
    def __init__(self, monkeypatch):
        self.now = timezone.now()
        monkeypatch.setattr(timezone, "now", lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    return Clock(monkeypatch)


def queued_job() -> DepthJob:
    return job_services.depth_job_create(image=upload())


def claimed(job: DepthJob, worker: str) -> DepthJob:
    job = DepthJob.objects.get(pk=job.pk)
    assert job_runs._claim(job, worker)
    return job


def test_a_claim_takes_a_lease(small_model, clock):
    job = claimed(queued_job(), "other-node:11:1")
    row = DepthJob.objects.get(pk=job.pk)
    assert row.lease_until == clock.now + timedelta(seconds=LEASE)


def test_another_nodes_job_is_recovered_once_its_lease_runs_out_not_after_the_job_timeout(small_model, clock,
                                                                                           enqueued):
    job = claimed(queued_job(), "other-node:11:1")
    clock.advance(LEASE - 1)
    assert depth_jobs_recover()["requeued"] == []
    assert DepthJob.objects.get(pk=job.pk).status == RunStatus.RUNNING
    clock.advance(2)  # the lease is over, far inside the job timeout (600 s + grace)
    outcome = depth_jobs_recover()
    row = DepthJob.objects.get(pk=job.pk)
    assert outcome["requeued"] == [str(job.pk)]
    assert (row.status, row.worker, row.attempts, row.lease_until) == (RunStatus.QUEUED, "", 1, None)
    assert enqueued[-1] == str(job.pk)  # a fresh task for it


def test_a_renewed_lease_keeps_the_job_and_only_its_own_attempt_can_renew(small_model, clock):
    job = claimed(queued_job(), "other-node:11:1")
    for _ in range(5):  # the worker renews every third of the lease, for longer than one lease
        clock.advance(LEASE / 3)
        assert depth_job_lease_renew(job_id=job.pk, worker=job.worker, attempts=job.attempts)
        assert depth_jobs_recover()["requeued"] == []
    assert not depth_job_lease_renew(job_id=job.pk, worker="other-node:99:1", attempts=job.attempts)
    assert not depth_job_lease_renew(job_id=job.pk, worker=job.worker, attempts=job.attempts + 1)
    clock.advance(LEASE + 1)
    assert depth_jobs_recover()["requeued"] == [str(job.pk)]


def test_the_heartbeat_renews_the_running_attempt(small_model, clock, monkeypatch):
    job = claimed(queued_job(), "other-node:11:1")
    monkeypatch.setattr(workers, "_running", {job.pk: (job.worker, job.attempts)})
    clock.advance(LEASE - 1)
    assert worker_heartbeat()["leases"] == 1
    clock.advance(LEASE - 1)
    assert depth_jobs_recover()["requeued"] == []
    assert DepthJob.objects.get(pk=job.pk).lease_until == clock.now + timedelta(seconds=1)


def test_an_expired_lease_with_no_attempts_left_fails_the_job(small_model, clock, settings):
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "max_attempts": 1}
    job = claimed(queued_job(), "other-node:11:1")
    clock.advance(LEASE + 1)
    assert depth_jobs_recover() == {"requeued": [], "failed": [str(job.pk)]}
    row = DepthJob.objects.get(pk=job.pk)
    assert row.status == RunStatus.FAILED and row.error_code == JobErrorCode.INTERRUPTED and row.lease_until is None


@pytest.mark.slow
def test_a_late_old_worker_cannot_overwrite_the_new_attempts_result(cached_small, clock):
    old = claimed(queued_job(), "other-node:11:1")
    clock.advance(LEASE + 1)
    assert depth_jobs_recover()["requeued"] == [str(old.pk)]
    new = depth_job_run(job=DepthJob.objects.get(pk=old.pk))  # the next delivery, on this node
    assert new.status == RunStatus.SUCCEEDED and new.attempts == 2
    finished = DepthJob.objects.get(pk=old.pk)

    # The old worker wakes up and reports its own outcome: neither it nor its heartbeat lands.
    old.fail("late failure", JobErrorCode.INTERNAL)
    assert not job_attempt_save(old, job_runs._FAIL_FIELDS)
    assert not depth_job_lease_renew(job_id=old.pk, worker=old.worker, attempts=old.attempts)
    row = DepthJob.objects.get(pk=old.pk)
    assert (row.status, row.error, row.attempts, row.worker, dict(row.result_files)) == (
        RunStatus.SUCCEEDED, "", 2, finished.worker, dict(finished.result_files))


def test_a_running_job_with_a_live_lease_is_left_alone_by_another_delivery(small_model, clock):
    job = claimed(queued_job(), "other-node:11:1")
    clock.advance(LEASE / 2)
    again = depth_job_run(job=DepthJob.objects.get(pk=job.pk))
    assert (again.status, again.attempts, again.worker) == (RunStatus.RUNNING, 1, "other-node:11:1")


# --- warm-model rows ------------------------------------------------------------------------------


def warm_row(model: RegisteredModel, worker: str, age: timedelta) -> WarmModel:
    stamp = timezone.now() - age
    return WarmModel.objects.create(model=model, worker=worker, node="n", device="cpu", dtype="float32",
                                    loaded_at=stamp, last_used_at=stamp)


@pytest.fixture
def pool_holding(monkeypatch):
    """This process's estimator pool, replaced by one holding networks of the given models (no weights needed: the
    heartbeat reads what a network is, not what it computes)."""
    from inference import estimator as estimator_module

    def hold(*models: RegisteredModel):
        pool = estimator_module.EstimatorPool()
        for model in models:
            weights = types.SimpleNamespace(sha256="sha", format="pt", pk=1)
            pool._insert(RowStub(model=model, weight_file=weights), timezone.now())
        monkeypatch.setattr(estimator_module, "_pool", pool)
        return pool

    return hold


def test_the_heartbeat_keeps_a_long_loaded_models_row_listed(small_model, clock, pool_holding):
    # Loaded 7 hours ago: past the status page's staleness bound unless the worker's heartbeat keeps it current.
    pool_holding(small_model)
    warm_row(small_model, worker_id(), timedelta(hours=7))
    warm_row(small_model, "other-node:1:1", timedelta(hours=7))  # another worker's row: not this one's to renew
    assert not warm_models().exists()
    assert worker_heartbeat()["warm"] == 1
    assert [w.worker for w in warm_models()] == [worker_id()]


def test_the_heartbeat_deletes_this_workers_rows_of_networks_it_no_longer_holds(small_model, clock, pool_holding):
    # An eviction whose row delete failed (the database was away) left its row: it went on being renewed, and
    # listed as warm, until the worker exited. The next beat deletes it; the held network's row stays.
    other = RegisteredModel.objects.get(name="MiDaS")
    pool_holding(small_model)
    held = warm_row(small_model, worker_id(), timedelta(seconds=5))
    warm_row(other, worker_id(), timedelta(seconds=5))  # no longer held
    elsewhere = warm_row(other, "other-node:1:1", timedelta(seconds=5))  # another worker's: not this one's to judge
    assert worker_heartbeat()["warm"] == 1
    assert sorted(WarmModel.objects.values_list("pk", flat=True)) == sorted([held.pk, elsewhere.pk])
    # Holding nothing: the worker's rows all go.
    pool_holding()
    assert worker_heartbeat()["warm"] == 0
    assert list(WarmModel.objects.values_list("pk", flat=True)) == [elsewhere.pk]


def test_recovery_removes_the_rows_of_workers_whose_heartbeat_stopped(small_model, clock):
    bound = job_recovery.warm_stale_seconds()
    alive = warm_row(small_model, "host:1", timedelta(seconds=bound - 5))
    warm_row(small_model, "dead:2", timedelta(seconds=bound + 5))
    depth_jobs_recover()
    assert list(WarmModel.objects.values_list("pk", flat=True)) == [alive.pk]


def test_the_heartbeat_thread_starts_once_per_worker_process_and_never_inline(settings, monkeypatch):
    started = []
    monkeypatch.setattr(workers, "_heartbeat_loop", lambda: started.append(1))
    monkeypatch.setattr(workers, "_heartbeat_pid", None)
    assert not workers.worker_heartbeat_start()  # tests run tasks inline (sync): no worker here
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "sync": False}
    assert workers.worker_heartbeat_start()
    assert not workers.worker_heartbeat_start()
    import time
    for _ in range(100):
        if started:
            break
        time.sleep(0.01)
    assert started == [1]


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_thread_renews_a_lease_through_its_own_connection(small_model, settings, monkeypatch):
    """A real thread with its own database connection (committed rows, no patched clock): the lease moves on."""
    import threading
    import time

    settings.DEPTHSITE_JOB_LEASE = 3  # a beat every second
    job = claimed(queued_job(), "other-node:11:1")
    first = DepthJob.objects.get(pk=job.pk).lease_until
    monkeypatch.setattr(workers, "_running", {job.pk: (job.worker, job.attempts)})
    stop = threading.Event()
    thread = threading.Thread(target=workers._heartbeat_loop, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while DepthJob.objects.get(pk=job.pk).lease_until == first and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert DepthJob.objects.get(pk=job.pk).lease_until > first


@pytest.mark.slow
def test_a_late_old_worker_cannot_replace_the_new_attempts_result_files(cached_small, clock):
    old = claimed(queued_job(), "other-node:11:1")
    clock.advance(LEASE + 1)
    depth_jobs_recover()
    new = depth_job_run(job=DepthJob.objects.get(pk=old.pk))
    folder = Path(settings.MEDIA_ROOT) / results_folder(job_id=new.pk)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert before and new.status == RunStatus.SUCCEEDED

    with pytest.raises(Superseded):
        with results_staged(job=old) as staging:
            staging.mkdir(parents=True)
            (staging / "depth.png").write_bytes(b"late")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # its staging folder went too


def test_a_live_workers_heartbeat_requeues_a_dead_nodes_job_once_its_lease_ran_out(small_model, clock, enqueued):
    dead = claimed(queued_job(), "dead-node:11:1")
    live = claimed(queued_job(), "other-node:12:1")
    clock.advance(LEASE - 1)
    assert depth_job_lease_renew(job_id=live.pk, worker=live.worker, attempts=live.attempts)
    assert worker_heartbeat()["requeued"] == 0
    clock.advance(2)  # the dead node's lease is over; the live one was renewed a second ago
    assert worker_heartbeat()["requeued"] == 1
    assert DepthJob.objects.get(pk=dead.pk).status == RunStatus.QUEUED and enqueued[-1] == str(dead.pk)
    assert DepthJob.objects.get(pk=live.pk).status == RunStatus.RUNNING
    assert worker_heartbeat()["requeued"] == 0  # requeued once, not at every beat


def test_an_idle_worker_requeues_jobs_whose_task_no_broker_list_holds(small_model, clock, enqueued, monkeypatch):
    stranded = queued_job()  # its task was taken by a cluster that died before a worker started it
    clock.advance(LEASE - 1)
    monkeypatch.setattr(job_recovery, "_broker_backlog", lambda: 0)
    assert worker_heartbeat()["requeued"] == 0  # queued for less than a lease: it may just be on its way
    clock.advance(2)
    monkeypatch.setattr(job_recovery, "_broker_backlog", lambda: 3)
    assert worker_heartbeat()["requeued"] == 0  # tasks wait in the broker: it may be one of them
    monkeypatch.setattr(job_recovery, "_broker_backlog", lambda: 0)
    assert worker_heartbeat()["requeued"] == 1 and enqueued[-1] == str(stranded.pk)
    assert worker_heartbeat()["requeued"] == 0  # once per lease period, not at every beat
    busy = claimed(queued_job(), "other-node:12:1")
    monkeypatch.setattr(workers, "_running", {busy.pk: (busy.worker, busy.attempts)})
    clock.advance(LEASE + 1)
    assert worker_heartbeat()["requeued"] == 0  # a busy worker leaves that to idle ones
