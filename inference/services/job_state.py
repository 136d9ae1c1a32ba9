"""A job row's conditional moves: a write lands only while the row is still what its writer saw.

Workers, deliveries and the recovery race for the same rows (two deliveries of one task, a late attempt whose
lease ran out, a job deleted while it ran); each one's update names the state it saw, and loses cleanly.
"""
from __future__ import annotations

from typing import Any, Iterable

from depthsite.choices import RunStatus
from inference.models import DepthJob


class Superseded(Exception):
    """This attempt no longer owns its job (its lease ran out and another attempt took it, or it was deleted)."""


def job_seen(job: DepthJob) -> dict[str, Any]:
    """What names the state a writer read: the row's status, its worker and its attempt count."""
    return {"status": job.status, "attempts": job.attempts, "worker": job.worker}


def job_attempt(*, worker: str, attempts: int) -> dict[str, Any]:
    """The row of one running attempt: running, in this worker, at this count."""
    return {"status": RunStatus.RUNNING, "worker": worker, "attempts": attempts}


def job_transition(*, job_id, expect: dict[str, Any], **values: Any) -> bool:
    """Write `values` to the job's row only while it still holds `expect`; False when it moved on or is gone."""
    return bool(DepthJob.objects.filter(pk=job_id, **expect).update(**values))


def job_attempt_save(job: DepthJob, fields: Iterable[str]) -> bool:
    """Write the attempt's outcome only while the row is still this attempt's: deleted or recovered meanwhile,
    it is not written."""
    return job_transition(job_id=job.pk, expect=job_attempt(worker=job.worker, attempts=job.attempts),
                          **{name: getattr(job, name) for name in fields})


def job_attempt_current(job: DepthJob) -> bool:
    """Whether the row is still this attempt's (read before publishing result files under its name)."""
    return DepthJob.objects.filter(pk=job.pk, **job_attempt(worker=job.worker, attempts=job.attempts)).exists()
