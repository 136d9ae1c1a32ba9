"""Database queries per job: creating and running one job stays within a small fixed number of queries.

At a fleet's scale the database is shared by every worker; these bounds keep a job's cost there constant
(docs/scale.md uses the per-job figure). The counts are of the warm path: the estimator already loaded.
"""
from __future__ import annotations

import pytest

from depthsite.choices import RunStatus
from inference.models import DepthJob
from inference.services.jobs import depth_job_create
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db

# Measured today: creating takes 4 (the model, the reuse and quota lookups, the insert); running takes 7 with
# result reuse on (load the row, claim it, resolve the weights once, look for a stored result, record the
# weights' use, check the attempt is still ours, save the result).
MAX_CREATE_QUERIES = 5
MAX_RUN_QUERIES = 7


@pytest.fixture
def warm_pool(cached_small):
    from inference.estimator import estimator_pool
    from inference.pipeline import estimator_ready

    estimator_ready(model=cached_small.model)
    yield
    estimator_pool().clear()


def _queued(django_capture_on_commit_callbacks, **kwargs) -> DepthJob:
    with django_capture_on_commit_callbacks(execute=False):
        job = depth_job_create(image=upload(), **kwargs)
    return job


def test_running_a_job_on_a_warm_worker_takes_few_queries(warm_pool, django_capture_on_commit_callbacks,
                                                          django_assert_max_num_queries, settings):
    from inference.tasks import depth_job_task

    settings.DEPTHSITE_REUSE_RESULTS = True  # the lookup for a stored result counts too

    job = _queued(django_capture_on_commit_callbacks)
    with django_assert_max_num_queries(MAX_RUN_QUERIES):
        depth_job_task(str(job.pk))  # what the worker runs: the id in, the row loaded, the job run
    job.refresh_from_db()
    assert job.status == RunStatus.SUCCEEDED, job.error


def test_creating_a_job_takes_few_queries(warm_pool, django_capture_on_commit_callbacks,
                                          django_assert_max_num_queries):
    with django_assert_max_num_queries(MAX_CREATE_QUERIES):
        _queued(django_capture_on_commit_callbacks)
    assert DepthJob.objects.count() == 1
