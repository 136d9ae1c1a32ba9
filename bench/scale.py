"""Scale benchmark: 1 and 2 worker nodes on one PostgreSQL and one Redis, per-job costs measured, not estimated.

    .venv/bin/python bench/scale.py [--jobs 24] [--nodes 1 2] [--idle 10] [--json]

For each node count: a fresh PostgreSQL database (DEPTHSITE_TEST_POSTGRES_URL, default the local server),
a Redis server of the bench's own on a free loopback port (so `INFO commandstats` counts nothing but this
site), a web server (runserver) and N `manage.py qcluster` nodes (one worker each, own DEPTHSITE_NODE and
weight cache, one shared media folder) with generated MiDaS_small weights imported in each cache.

Measured, after a warm-up batch that loads the network in every worker:
  idle        SQL statements/s and Redis commands/s while nothing is queued (heartbeats, schedulers, pushers)
  jobs/s      `--jobs` unique photos submitted through the HTTP API at once, until the last one finished
  latency     p50/p99 of submit (client clock, before the POST) -> finished_at (the job row)
  SQL/job     statements sent by every process (web + cluster: counted by depthsite.querycount in each
              process, DEPTHSITE_COUNT_QUERIES_DIR), during the batch, divided by the jobs
  Redis/job   commands the server executed during the batch (`INFO commandstats` delta), divided by the jobs
The bench polls the job rows with its own PostgreSQL connection, so polling adds nothing to the counts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.faultlib import common  # noqa: E402
from bench.faultlib.common import MANAGE, PYTHON, free_port, install_handlers, percentile, spawn, stop  # noqa: E402
from bench.faultlib.jobs import photo  # noqa: E402
from depthsite.querycount import queries_counted  # noqa: E402
from depthsite.testing.cli import Site  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get("DEPTHSITE_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
SITE_ENV = {"DEPTHSITE_WORKERS": "1", "DEPTHSITE_JOB_TIMEOUT": "300", "DEPTHSITE_JOB_MAX_ATTEMPTS": "2",
            "DEPTHSITE_UPLOAD_RATE": "100000/hour", "DEPTHSITE_WRITE_RATE": "100000/hour",
            "DEPTHSITE_OFFLINE": "1", "DEPTHSITE_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}


class RedisServer:
    """A throwaway redis-server on a free loopback port, without persistence."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(folder)], env=dict(os.environ),
                             log=folder / "redis.log")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.cli("PING").strip() == "PONG":
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10)
        return done.stdout

    def commands(self) -> dict[str, int]:
        """{command: calls} from INFO commandstats."""
        calls = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, stats = line[len("cmdstat_"):].split(":", 1)
                calls[name] = int(dict(item.split("=") for item in stats.split(","))["calls"])
        return calls


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after.get(key, 0) - before.get(key, 0) for key in after if after.get(key, 0) != before.get(key, 0)}


def _roles(counts: dict[str, int]) -> dict[str, int]:
    """The per-role totals of queries_counted (its other keys are "<role> <verb> <table>")."""
    return {key: value for key, value in counts.items() if " " not in key}


def _sql(database_url: str, query: str, *params) -> list[tuple]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()


class Cluster:
    """The site: a database, a web server and N qcluster nodes (depthsite.testing.cli Sites sharing one media folder)."""

    def __init__(self, root: Path, nodes: int, redis: RedisServer, weights: Path):
        import psycopg

        self.root = root
        self.name = f"depthsite_scale_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        common.on_exit(self.drop)
        self.database_url = f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{self.name}"
        self.counts = root / "query-counts"
        shared = {**SITE_ENV, "DATABASE_URL": self.database_url, "REDIS_URL": redis.url,
                  "DEPTHSITE_QUEUE_NAME": self.name, "DEPTHSITE_MEDIA_ROOT": str(root / "media"),
                  "DEPTHSITE_COUNT_QUERIES_DIR": str(self.counts)}
        self.sites = [Site(root=root / f"node-{n + 1}", extra_env={**shared, "DEPTHSITE_NODE": f"node-{n + 1}"})
                      for n in range(nodes)]
        for site in self.sites:
            site.root.mkdir(parents=True)
        self._manage(self.sites[0], "migrate", "--noinput", "-v0")
        for site in self.sites:
            self._manage(site, "models", "import", str(weights))
        self.token = self._manage(self.sites[0], "shell", "-c", (
            "from django.contrib.auth import get_user_model; from rest_framework.authtoken.models import Token; "
            "user = get_user_model().objects.create_user('bench', password='pw-bench-12345'); "
            "print(Token.objects.create(user=user).key)")).strip().splitlines()[-1]
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.processes = [spawn([PYTHON, MANAGE, "runserver", "--noreload", f"127.0.0.1:{port}"],
                                env=self.sites[0].env(), log=root / "web.log")]
        self.processes += [spawn([PYTHON, MANAGE, "qcluster"], env=site.env(), log=site.root / "qcluster.log")
                           for site in self.sites]
        self._wait_web()

    def _manage(self, site: Site, *args: str) -> str:
        done = site.manage(*args, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done.stdout

    def _wait_web(self) -> None:
        import requests

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base_url}/api/predictions/", timeout=2,
                                headers={"Authorization": f"Token {self.token}"}).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the web server did not answer")

    def submit(self, image: bytes, name: str) -> str:
        import requests

        response = requests.post(f"{self.base_url}/api/predictions/", files={"image": (name, image)},
                                 data={"outputs": "png"}, headers={"Authorization": f"Token {self.token}"},
                                 timeout=120)
        if response.status_code != 202:
            raise RuntimeError(f"submit: {response.status_code} {response.text[:500]}")
        return response.json()["id"]

    def wait(self, ids: list[str], timeout: float) -> dict[str, tuple[str, float, int, str]]:
        """{id: (status, finished_at epoch, attempts, worker)} once every job is terminal (read from PostgreSQL)."""
        wanted = [uuid.UUID(job_id) for job_id in ids]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = _sql(self.database_url, "SELECT id, status, finished_at, attempts, worker FROM inference_depthjob "
                                           "WHERE id = ANY(%s)", wanted)
            if len(rows) == len(ids) and all(row[1] in ("succeeded", "failed") for row in rows):
                return {str(row[0]): (row[1], row[2].timestamp(), row[3], row[4]) for row in rows}
            time.sleep(0.2)
        raise RuntimeError(f"jobs not finished after {timeout} s")

    def stop(self) -> None:
        for process in self.processes:
            stop(process, grace=30)

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _batch(cluster: Cluster, count: int, seed: int) -> tuple[list[str], dict[str, float]]:
    photos = [photo(seed + n, 320, 240) for n in range(count)]
    submitted = {}
    for n, image in enumerate(photos):
        started = time.time()
        submitted[cluster.submit(image, f"photo-{seed + n}.jpg")] = started
    return list(submitted), submitted


def measure(nodes: int, jobs: int, idle: float, workdir: Path, weights: Path) -> dict:
    redis = RedisServer(workdir / f"redis-{nodes}")
    cluster = Cluster(workdir / f"site-{nodes}", nodes, redis, weights)
    try:
        # Warm-up: enough jobs that every worker has loaded the network once.
        warm_ids, _ = _batch(cluster, 3 * nodes, seed=10_000 * nodes)
        cluster.wait(warm_ids, timeout=600)

        time.sleep(2)
        sql_before, redis_before = queries_counted(folder=cluster.counts), redis.commands()
        time.sleep(idle)
        sql_idle = sum(_roles(_delta(queries_counted(folder=cluster.counts), sql_before)).values()) / idle
        redis_idle = sum(_delta(redis.commands(), redis_before).values()) / idle

        sql_before, redis_before = queries_counted(folder=cluster.counts), redis.commands()
        first = time.time()
        ids, submitted = _batch(cluster, jobs, seed=20_000 * nodes)
        done = cluster.wait(ids, timeout=1200)
        last = max(row[1] for row in done.values())
        time.sleep(1)  # let the cluster's monitor save the last results
        sql = _delta(queries_counted(folder=cluster.counts), sql_before)
        redis_calls = _delta(redis.commands(), redis_before)
        took = last - first
        latencies = [done[job_id][1] - submitted[job_id] for job_id in ids]
        by_node: dict[str, int] = {}
        for _, _, _, worker in done.values():
            node = worker.split(":")[0]
            by_node[node] = by_node.get(node, 0) + 1
        return {
            "nodes": nodes,
            "jobs": jobs,
            "failed": sum(1 for row in done.values() if row[0] != "succeeded"),
            "attempts": sum(row[2] for row in done.values()),
            "jobs_by_node": by_node,
            "seconds": round(took, 2),
            "jobs_per_s": round(jobs / took, 3),
            "p50_s": round(percentile(latencies, 50), 2),
            "p99_s": round(percentile(latencies, 99), 2),
            "sql_per_job": round(sum(_roles(sql).values()) / jobs, 1),
            "sql_per_job_by_role": {role: round(count / jobs, 1) for role, count in sorted(_roles(sql).items())},
            "sql_per_job_by_statement": {kind: round(count / jobs, 2) for kind, count in
                                         sorted(sql.items(), key=lambda item: -item[1]) if " " in kind},
            "redis_per_job": round(sum(redis_calls.values()) / jobs, 1),
            "redis_per_job_by_command": {name: round(calls / jobs, 2) for name, calls in
                                         sorted(redis_calls.items(), key=lambda item: -item[1])},
            "idle_sql_per_s": round(sql_idle, 2),
            "idle_redis_per_s": round(redis_idle, 2),
            "batch_window_s": round(time.time() - first, 1),
        }
    finally:
        cluster.stop()
        stop(redis.process)
        cluster.drop()


def weights_file(folder: Path) -> Path:
    path = folder / "midas_v21_small_256.pt"
    code = ("import sys; from models_registry.detweights import det_numpy_state_dict; "
            "from models_registry.formats import write_weights; "
            "write_weights(det_numpy_state_dict('MiDaS_small'), sys.argv[1], 'pt', {})")
    subprocess.run([PYTHON, "-c", code, str(path)], cwd=ROOT, check=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return path


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| nodes | jobs | jobs/s | p50 s | p99 s | SQL/job (web + cluster) | Redis cmds/job | idle SQL/s | "
             "idle Redis/s | jobs per node |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        roles = " + ".join(f"{value:g}" for _, value in sorted(r["sql_per_job_by_role"].items(), reverse=True))
        per_node = ", ".join(f"{node}: {count}" for node, count in sorted(r["jobs_by_node"].items()))
        lines.append(f"| {r['nodes']} | {r['jobs']} | {r['jobs_per_s']} | {r['p50_s']} | {r['p99_s']} | "
                     f"{r['sql_per_job']} ({roles}) | {r['redis_per_job']} | {r['idle_sql_per_s']} | "
                     f"{r['idle_redis_per_s']} | {per_node} |")
    lines.append("")
    for r in results:
        top = ", ".join(f"{name} {calls:g}" for name, calls in list(r["redis_per_job_by_command"].items())[:8])
        lines.append(f"- {r['nodes']} node(s), Redis commands per job: {top}")
        statements = ", ".join(f"{kind} {count:g}" for kind, count in r["sql_per_job_by_statement"].items())
        lines.append(f"- {r['nodes']} node(s), SQL statements per job: {statements}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    install_handlers()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed: the bench runs a Redis of its own")
    workdir = Path(tempfile.mkdtemp(prefix="depthsite-scale-"))
    common.on_exit(lambda: shutil.rmtree(workdir, ignore_errors=True))
    weights = weights_file(workdir)
    load = os.getloadavg()[0]
    results = [measure(nodes, args.jobs, args.idle, workdir, weights) for nodes in args.nodes]
    machine = (f"{os.cpu_count()} cores, load {load:.1f} at start, {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
               "MiDaS_small on CPU, 320x240 photos, one worker per node, outputs png")
    print(json.dumps({"machine": machine, "results": results}, indent=2) if args.json else markdown(results, machine))


if __name__ == "__main__":
    main()
