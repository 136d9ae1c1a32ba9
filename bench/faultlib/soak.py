"""A soak: N anonymous clients upload photos and poll their jobs for M minutes against `scripts/run.sh`'s servers.

The site is started as `make run` starts it (scripts/run.sh: qcluster + runserver on 127.0.0.1, anonymous
uploads and status on) but on a throwaway database, media folder and cache with generated MiDaS_small
weights imported, and with the upload throttle raised (the soak measures latency, not the throttle). Each
client is closed-loop: upload, poll until the job ends, repeat, until the deadline or its job cap; then the
servers are stopped (also on Ctrl-C: the bench kills the whole process group).
"""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import requests
from PIL import Image

from bench.faultlib.common import ROOT, Result, Workspace, free_port, manage, percentile, spawn, stop

MAX_JOBS_PER_CLIENT = 500
JOB_WAIT_SECONDS = 180


def _photo(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class Client(threading.Thread):
    def __init__(self, base: str, seed: int, deadline: float):
        super().__init__(daemon=True)
        self.base, self.deadline = base, deadline
        self.rng = np.random.default_rng(seed)
        self.session = requests.Session()
        self.latencies: list[float] = []  # seconds per HTTP request
        self.turnarounds: list[float] = []  # submit to done, seconds
        self.errors: list[str] = []
        self.jobs = 0

    def _call(self, method: str, url: str, **kwargs) -> requests.Response | None:
        began = time.monotonic()
        try:
            response = self.session.request(method, url, timeout=60, **kwargs)
        except requests.RequestException as exc:
            self.errors.append(f"{method} {url}: {type(exc).__name__}")
            return None
        self.latencies.append(time.monotonic() - began)
        if response.status_code >= 400:
            self.errors.append(f"{method} {url}: {response.status_code} {response.text[:120]}")
            return None
        return response

    def run(self) -> None:
        while time.monotonic() < self.deadline and self.jobs < MAX_JOBS_PER_CLIENT:
            submitted = time.monotonic()
            response = self._call("POST", f"{self.base}/api/predictions/",
                                  files={"image": ("photo.jpg", _photo(self.rng))},
                                  data={"outputs": "png", "model": "MiDaS_small"})
            if response is None:
                time.sleep(0.5)
                continue
            self.jobs += 1
            job = response.json()["id"]
            polls = 0
            wait_until = time.monotonic() + JOB_WAIT_SECONDS
            while time.monotonic() < wait_until:
                # Alternate the API and the job page's own poll, as browsers and scripts would.
                url = (f"{self.base}/api/predictions/{job}/" if polls % 2 == 0
                       else f"{self.base}/jobs/{job}/status.json")
                polls += 1
                status = self._call("GET", url)
                body = status.json() if status is not None else {}
                if body.get("status") == "succeeded":
                    self.turnarounds.append(time.monotonic() - submitted)
                    break
                if body.get("status") == "failed":
                    self.errors.append(f"job {job} failed: {body.get('error')}")
                    break
                time.sleep(0.25)
            else:
                self.errors.append(f"job {job} not finished within {JOB_WAIT_SECONDS} s")


def soak(workspace: Workspace) -> Result:
    result = Result("soak")
    clients = 2 if workspace.quick else workspace.soak_clients
    minutes = 0.25 if workspace.quick else workspace.soak_minutes
    site = workspace.site("soak", DEPTHSITE_UPLOAD_RATE="1000000/hour", DEPTHSITE_WRITE_RATE="1000000/hour")
    imported = manage(site, "models", "import", str(workspace.checkpoint()), "--model", "MiDaS_small", timeout=600)
    if imported.returncode != 0:
        raise RuntimeError(f"import failed: {imported.stderr[-500:]}")
    port = free_port()
    env = site.env(DEPTHSITE_PORT=str(port), DEPTHSITE_HOST="127.0.0.1")
    for key in ("DEPTHSITE_PUBLIC_UPLOADS", "DEPTHSITE_PUBLIC_STATUS", "DEPTHSITE_LOG_LEVEL"):
        env.pop(key, None)  # run.sh's own defaults, as under `make run`
    server = spawn(["bash", str(ROOT / "scripts" / "run.sh")], env=env, log=site.root / "run.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"run.sh exited: {(site.root / 'run.log').read_text()[-800:]}")
            try:
                if requests.get(f"{base}/api/predictions/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        # One warm-up job, so the figures are of a running site, not of the first model load.
        warm = Client(base, 0, time.monotonic() + 1)
        warm.run()
        started = time.monotonic()
        threads = [Client(base, n + 1, started + minutes * 60) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=minutes * 60 + JOB_WAIT_SECONDS + 60)
        took = time.monotonic() - started
    finally:
        stop(server)
    latencies = [value for thread in threads for value in thread.latencies]
    turnarounds = [value for thread in threads for value in thread.turnarounds]
    errors = [error for thread in threads for error in thread.errors]
    jobs = sum(thread.jobs for thread in threads)
    result.runs = jobs
    result.figures = {
        "clients x minutes": f"{clients} x {minutes:g}",
        "jobs done": len(turnarounds),
        "requests": len(latencies),
        "errors": len(errors),
        "request p50 ms": round(1000 * percentile(latencies, 50), 1) if latencies else None,
        "request p99 ms": round(1000 * percentile(latencies, 99), 1) if latencies else None,
        "submit-to-done p50 s": round(percentile(turnarounds, 50), 2) if turnarounds else None,
        "submit-to-done p99 s": round(percentile(turnarounds, 99), 2) if turnarounds else None,
        "jobs/min": round(len(turnarounds) / (took / 60), 1) if took else None,
    }
    result.details = [{"errors": errors[:50], "warm-up errors": warm.errors}]
    result.expect(not errors, f"{len(errors)} error(s), first: {errors[0] if errors else ''}")
    result.expect(len(turnarounds) == jobs and jobs > 0, f"{jobs - len(turnarounds)} of {jobs} job(s) did not finish")
    return result
