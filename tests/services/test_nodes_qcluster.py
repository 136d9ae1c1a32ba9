"""Two worker nodes for real: two `manage.py qcluster` (own DEPTHSITE_NODE and weight cache, one shared media
folder) and a web server against one PostgreSQL database and one Redis; one node is SIGKILLed mid-job.

All jobs finish, each exactly once (one result, attempts counted on the row), both nodes ran jobs, and each
node's WeightFile rows are its own. A short DEPTHSITE_JOB_LEASE bounds the wait for the dead node's job.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from models_registry.formats import write_weights
from tests.conftest import require_service
from depthsite.testing.e2e import _start, start_site, stop_site
from tests.jobs.test_e2e_qcluster import unique_photo
from depthsite.testing.cli import Site, make_site
from models_registry.detweights import det_numpy_state_dict

pytestmark = [pytest.mark.slow, pytest.mark.services]
POSTGRES_ADMIN_URL = os.environ.get("DEPTHSITE_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DEPTHSITE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LEASE = 6
JOBS = 8


@pytest.fixture
def two_nodes(tmp_path):
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    import psycopg
    import redis

    name = f"depthsite_nodes_{uuid.uuid4().hex[:10]}"
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = f"{base}/{name}"
    weights = tmp_path / "midas_v21_small_256.pt"
    write_weights(det_numpy_state_dict("MiDaS_small"), weights, "pt", {})
    shared = {"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "DEPTHSITE_QUEUE_NAME": name,
              "DEPTHSITE_MEDIA_ROOT": str(tmp_path / "shared-media"), "DEPTHSITE_JOB_LEASE": str(LEASE),
              "DEPTHSITE_JOB_MAX_ATTEMPTS": "2", "DEPTHSITE_JOB_TIMEOUT": "120", "DEPTHSITE_WORKERS": "1",
              "OMP_NUM_THREADS": "1"}
    running = None
    try:
        node_a = make_site(tmp_path / "node-a", DEPTHSITE_NODE="node-a", **shared)
        node_b = Site(root=tmp_path / "node-b", extra_env={"DEPTHSITE_NODE": "node-b", **shared})
        node_b.root.mkdir()
        imported = node_b.manage("models", "import", str(weights), timeout=300)
        assert imported.returncode == 0, imported.stderr
        running = start_site(node_a, weights, database_url=database_url)  # imports on node-a, web + qcluster a
        process, log = _start(node_b, "qcluster-b", ["qcluster"], node_b.env(DEPTHSITE_LOG_LEVEL="INFO"))
        running.processes["qcluster-b"], running.logs["qcluster-b"] = process, log
        yield running
    finally:
        if running is not None:
            stop_site(running)
        client = redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"django_q:{name}:*"):
            client.delete(key)
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _rows(database_url: str, sql: str, *params) -> list[tuple]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


def test_a_node_killed_mid_job_loses_nothing_and_runs_nothing_twice(two_nodes):
    running = two_nodes
    started = time.monotonic()
    ids = [running.submit(unique_photo(1200, 900, seed=500 + n), f"photo-{n}.jpg", outputs="png,npy")["id"]
           for n in range(JOBS)]

    # Wait for node-b to run a job, then kill its whole cluster (sentinel, pusher, monitor, worker) at once.
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        found = _rows(running.database_url, "SELECT id FROM inference_depthjob WHERE status = 'running' "
                                            "AND worker LIKE 'node-b:%%'")
        victim = str(found[0][0]) if found else None
        time.sleep(0.05)
    assert victim is not None, f"node-b never ran a job\n{running.log_tail()}"
    os.killpg(running.processes["qcluster-b"].pid, signal.SIGKILL)
    running.processes["qcluster-b"].wait(timeout=10)
    killed_at = time.monotonic()

    done = running.wait(ids, timeout=75)
    recovered_after = time.monotonic() - killed_at
    assert all(body["status"] == "succeeded" for body in done.values()), \
        {job_id: body["error"] for job_id, body in done.items()}

    rows = {str(job_id): (attempts, worker, files) for job_id, attempts, worker, files in _rows(
        running.database_url, "SELECT id, attempts, worker, result_files FROM inference_depthjob")}
    assert set(rows) == set(ids)
    # The killed job started again on the other node; every other job started exactly once.
    assert rows[victim][0] == 2 and rows[victim][1].startswith("node-a:"), rows[victim]
    assert all(attempts == 1 for job_id, (attempts, _, _) in rows.items() if job_id != victim), rows
    # Both nodes were used: node-b ran the victim's first attempt, node-a finished jobs.
    assert sum(worker.startswith("node-a:") for _, worker, _ in rows.values()) >= 1
    # Exactly one result each: its own folder holds exactly its recorded files, nothing half-written left.
    media = Path(running.site.env()["DEPTHSITE_MEDIA_ROOT"])
    for job_id, (_, _, files) in rows.items():
        on_disk = sorted(path.name for path in (media / "results" / job_id).iterdir())
        assert on_disk == sorted(Path(name).name for name in files.values()) and set(files) >= {"png", "npy"}
    assert not [p.name for p in (media / "results").iterdir() if p.name.startswith(".tmp-")
                and not p.name.startswith(f".tmp-{victim}")]

    # Per-node cache records: the same file recorded once per node, each under its own node.
    # A node that ran a job also built its own runtime artifact (format onnx), keyed by the same weights.
    files = _rows(running.database_url,
                  "SELECT node, format, content_digest FROM models_registry_weightfile ORDER BY node, format")
    weights = [(node, fmt) for node, fmt, _ in files if fmt != "onnx"]
    assert weights == [("node-a", "pt"), ("node-b", "pt")], files
    digests = {digest for _, fmt, digest in files if fmt == "pt"}
    assert len(digests) == 1, files
    artifacts = [(node, digest) for node, fmt, digest in files if fmt == "onnx"]
    assert all(digest in digests and (node, "pt") in weights for node, digest in artifacts), files
    status_b = running.session().get(f"{running.base_url}/api/models/status", params={"node": "node-b"},
                                     timeout=30).json()
    assert status_b["node"] == "node-b" and status_b["totals"]["files"] == 1
    print(f"\n2 nodes, {JOBS} jobs, node-b killed mid-job: all done {recovered_after:.1f} s after the kill "
          f"({time.monotonic() - started:.1f} s in all)")
