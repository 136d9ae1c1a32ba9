"""Job-path benchmark: a real web server and a real qcluster on loopback, jobs through the HTTP API.

    .venv/bin/python bench/jobs.py [--brokers orm,redis] [--jobs 20] [--concurrency 1,4,16] [--no-large] [--json]

For each broker (the ORM broker on SQLite behind runserver, as `make run`; Redis with PostgreSQL behind
gunicorn with deploy/gunicorn.conf.py, as a fleet; --web overrides the web server) it starts an isolated
site (depthsite.testing.e2e) with --model's weights (MiDaS_small) and --workers workers (1), then measures:

  overhead     submit -> result stored, minus the forward time the worker recorded on the job, over
               --jobs sequential jobs of distinct photos (no result reuse): p50 and p99; each job's end is
               read from its row, so the bench's own polling puts no requests on the web server
  throughput   N jobs submitted at once (N in --concurrency), jobs/s from the first submit to the last
               finish (read from the job rows), against the bare estimator's images/s on the same photos
               in the same run
  queries      database queries of one job run by the worker's task function (CaptureQueriesContext)

and once, on the ORM site: the worker's peak RSS (VmHWM) after a DPT_Large job, against DPT_Large's weight
bytes and the import floor (a process that imported what the worker did, nothing loaded: Django, the estimator,
onnxruntime, and torch and timm only where the worker had loaded libtorch).
Every figure comes from this run; nothing is typed in from elsewhere. Bounded: each phase has a timeout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from depthsite.testing.e2e import (  # noqa: E402
    WEB_SERVERS,
    RunningSite,
    orm_site,
    redis_postgres_site,
    stop_site,
    unique_photo,
)

SITE_ENV = {"DEPTHSITE_WORKERS": "1", "DEPTHSITE_JOB_TIMEOUT": "600", "DEPTHSITE_WARM_MODELS": "2"}
PHOTO = (384, 288)  # a phone photo scaled down: MiDaS_small runs it at 256 on the long side


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure_overhead(running: RunningSite, count: int, seed: int, model: str) -> dict:
    """Sequential jobs: each one's submit -> finished_at, minus its recorded forward time."""
    # The first job loads the model (and builds its artifact on a fresh site).
    warm_up = running.submit(unique_photo(*PHOTO, seed=seed - 1), "warm-up.jpg", model=model)
    running.wait_rows([warm_up["id"]], timeout=600)
    overheads, totals = [], []
    for index in range(count):
        # Made before the clock starts: synthesising a photo takes the client about 15 ms, none of it the job's.
        photo = unique_photo(*PHOTO, seed=seed + index)
        submitted = time.time()
        job = running.submit(photo, f"photo-{index}.jpg", model=model)
        # Completion read from the job's row (as for throughput): the API's status polling would add its own
        # requests to the web server, on the cores the job runs on.
        body = running.wait_rows([job["id"]], timeout=120)[job["id"]]
        assert body["status"] == "succeeded", body
        total = body["finished_at"] - submitted
        totals.append(total)
        overheads.append(total - body["inference_ms"] / 1000)
    return {"jobs": count, "overhead_p50_ms": 1000 * statistics.median(overheads),
            "overhead_p99_ms": 1000 * _percentile(overheads, 0.99),
            "submit_to_done_p50_ms": 1000 * statistics.median(totals)}


def measure_throughput(running: RunningSite, n: int, seed: int, model: str) -> dict:
    photos = [unique_photo(*PHOTO, seed=seed + i) for i in range(n)]
    jobs: list[dict] = [None] * n  # type: ignore[list-item]

    def send(i: int) -> None:
        jobs[i] = running.submit(photos[i], f"c{n}-{i}.jpg", model=model)

    started = time.time()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Completion read from the database: polling N jobs through the API would take the web server's CPU,
    # on the cores the worker runs on, and count the bench's own client against the site.
    done = running.wait_rows([job["id"] for job in jobs], timeout=60 + 10 * n)
    assert all(row["status"] == "succeeded" for row in done.values()), done
    finished = max(row["finished_at"] for row in done.values())
    return {"n": n, "jobs_per_s": n / (finished - started),
            "forward_s_mean": statistics.mean(row["inference_ms"] for row in done.values()) / 1000}


BARE = """
import json, time, sys, io
from PIL import Image
import numpy as np
from inference.pipeline import estimator_ready
from models_registry.selectors import model_get
from depthsite.testing.e2e import unique_photo
width, height, seed, count = {width}, {height}, {seed}, {count}
_, estimator = estimator_ready(model=model_get(name="{model}"))
photos = [np.asarray(Image.open(io.BytesIO(unique_photo(width, height, seed=seed + i))).convert("RGB")) for i in range(count)]
estimator.predict(photos[0])
started = time.perf_counter()
for photo in photos:
    estimator.predict(photo)
print(json.dumps({{"images_per_s": count / (time.perf_counter() - started)}}))
"""

QUERIES = """
import json
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.core.files.uploadedfile import SimpleUploadedFile
from inference.services.jobs import depth_job_create
from inference.tasks import depth_job_task
from inference.pipeline import estimator_ready
from models_registry.selectors import model_get
from depthsite.testing.e2e import unique_photo
estimator_ready(model=model_get(name="MODEL"))
job = depth_job_create(image=SimpleUploadedFile("q.jpg", unique_photo(96, 72, seed=424242), content_type="image/jpeg"),
                       model="MODEL")
with CaptureQueriesContext(connection) as run:
    depth_job_task(str(job.pk))
from django_q.brokers import get_broker
get_broker().purge_queue()  # the task this job queued, on a queue of its own that no cluster serves
print(json.dumps({"run_queries": len(run.captured_queries)}))
"""

# What the worker imported, nothing loaded: torch and timm only where the worker has libtorch mapped (an
# eager model); the ONNX path needs onnxruntime alone.
FLOOR = """
import json, django
django.setup()
if WORKER_HAS_TORCH:
    import torch, timm
import onnxruntime
import inference.estimator, inference.runtime.onnx
print(json.dumps({"rss_kb": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])}))
"""


def site_python(running: RunningSite, code: str, timeout: float = 300, **env: str) -> dict:
    """Run `code` inside the site (manage.py shell) and parse the JSON line it prints last."""
    result = running.site.manage("shell", "-c", code, timeout=timeout, **env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_large(running: RunningSite, weights_large: Path) -> dict:
    imported = running.site.manage("models", "import", str(weights_large), timeout=600)
    assert imported.returncode == 0, imported.stderr
    job = running.submit(unique_photo(*PHOTO, seed=777), "large.jpg", model="DPT_Large")
    body = running.wait([job["id"]], timeout=600)[job["id"]]
    assert body["status"] == "succeeded", body
    pid = int(running.row(job["id"])["worker"].rsplit(":", 2)[1])
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    has_torch = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    floor = site_python(running, FLOOR.replace("WORKER_HAS_TORCH", str(has_torch)))["rss_kb"]
    weight_bytes = weights_large.stat().st_size
    return {"model": "DPT_Large", "worker_has_torch": has_torch, "worker_peak_rss_mb": peak_kb / 1024,
            "import_floor_mb": floor / 1024,
            "weights_mb": weight_bytes / 2**20,
            "peak_over_floor_per_weight_byte": (peak_kb - floor) * 1024 / weight_bytes}


WEB = {"orm": "runserver", "redis": "gunicorn"}  # as each is deployed: `make run`, deploy/


def run_broker(broker: str, root: Path, weights: Path, args, weights_large: Path | None) -> dict:
    make = orm_site if broker == "orm" else redis_postgres_site
    web = args.web or WEB[broker]
    site_env = {**SITE_ENV, "DEPTHSITE_WORKERS": str(args.workers), "DEPTHSITE_TORCH_THREADS": str(args.threads)}
    running, cleanup = make(root / broker, weights, web=web, **site_env)
    try:
        row: dict = {"broker": broker, "web": web, "workers": args.workers, "threads": args.threads}
        row.update(measure_overhead(running, args.jobs, seed=1000, model=args.model))
        # The bare estimator as a script would run it: one process, every core (whatever the workers use).
        bare = site_python(running, BARE.format(width=PHOTO[0], height=PHOTO[1], seed=5000, count=16,
                                                model=args.model), DEPTHSITE_TORCH_THREADS="0")
        row["bare_images_per_s"] = bare["images_per_s"]
        row["throughput"] = []
        for n in args.concurrency:
            measured = measure_throughput(running, n, seed=10_000 * n, model=args.model)
            measured["vs_bare"] = measured["jobs_per_s"] / bare["images_per_s"]
            row["throughput"].append(measured)
        # On a queue no cluster serves: the job is run here, once, by the task function, and counted.
        row.update(site_python(running, QUERIES.replace("MODEL", args.model),
                               DEPTHSITE_QUEUE_NAME=f"bench-queries-{broker}"))
        if weights_large is not None:
            row["memory"] = peak_rss_large(running, weights_large)
        return row
    finally:
        stop_site(running)
        cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="orm,redis")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--no-large", action="store_true", help="skip the DPT_Large memory figure")
    parser.add_argument("--model", default="MiDaS_small", help="the model of every job (its weights generated)")
    parser.add_argument("--workers", type=int, default=1, help="qcluster worker processes (DEPTHSITE_WORKERS)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of each worker's network (DEPTHSITE_TORCH_THREADS; 0: one per core)")
    parser.add_argument("--web", choices=WEB_SERVERS, help="one web server for both sites (default: as deployed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",")]

    from models_registry.detweights import CATALOGUE_DIR, det_numpy_state_dict
    from models_registry.formats import write_weights

    rows = []
    with tempfile.TemporaryDirectory(prefix="depthsite-bench-jobs-") as tmp:
        root = Path(tmp)
        checkpoint = json.loads((CATALOGUE_DIR / f"keys_{args.model}.json").read_text())["checkpoint_file"]
        weights = root / checkpoint  # the catalogue's file name: `models import` knows the model by it
        write_weights(det_numpy_state_dict(args.model), weights, "pt", {})
        weights_large = None
        if not args.no_large:
            weights_large = root / "dpt_large_384.pt"
            write_weights(det_numpy_state_dict("DPT_Large"), weights_large, "pt", {})
        for index, broker in enumerate(args.brokers.split(",")):
            rows.append(run_broker(broker, root, weights, args, weights_large if index == 0 else None))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    threads = args.threads or "all cores'"
    print(f"Job path, {args.model} on {PHOTO[0]}x{PHOTO[1]} photos, {args.workers} worker(s) of {threads} thread(s) "
          f"({args.jobs} sequential jobs)")
    print(f"{'broker':7} {'web':10} {'overhead p50':>13} {'p99':>8} {'submit->done p50':>17} {'queries/job':>12}")
    for row in rows:
        print(f"{row['broker']:7} {row['web']:10} {row['overhead_p50_ms']:>10.0f} ms {row['overhead_p99_ms']:>5.0f} ms "
              f"{row['submit_to_done_p50_ms']:>14.0f} ms {row['run_queries']:>12}")
    print()
    print(f"{'broker':7} {'N':>3} {'jobs/s':>7} {'bare img/s':>11} {'ratio':>6}")
    for row in rows:
        for t in row["throughput"]:
            print(f"{row['broker']:7} {t['n']:>3} {t['jobs_per_s']:>7.2f} {row['bare_images_per_s']:>11.2f} "
                  f"{t['vs_bare']:>6.2f}")
    for row in rows:
        if "memory" in row:
            m = row["memory"]
            print(f"\nworker peak RSS with DPT_Large warm: {m['worker_peak_rss_mb']:.0f} MB = import floor "
                  f"{m['import_floor_mb']:.0f} MB + {m['peak_over_floor_per_weight_byte']:.2f} x weights "
                  f"({m['weights_mb']:.0f} MB); torch {'imported' if m['worker_has_torch'] else 'never imported'} "
                  "in the worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
